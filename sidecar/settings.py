"""Settings: the only module that reads the environment.

Rules that hold here:
1. Every setting is `SIDECAR_<FIELD>`; `config/sidecar.env.example` documents each one.
2. Validation happens all at once, before anything starts (oauth2-proxy style): the caller
   gets every problem in one go, each naming its variable.
3. Secrets are `SecretStr`; nothing here ever formats a secret into a message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sidecar.dependency_log import register_secret
from sidecar.dsn import check_postgres_url
from sidecar.eventloop import uvloop_installed
from sidecar.rate import Rate, parse_rate
from sidecar.redisurl import check_readable_file, check_redis_url, url_facts
from sidecar.routing import PublicRoute, ScopeRoute, parse_public_routes, parse_scope_routes
from sidecar.trust import IPNetwork

ENV_PREFIX = "SIDECAR_"


_LISTEN_RE = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(value: str) -> Listen:
    m = _LISTEN_RE.match(value.strip())
    if not m:
        raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:8080 or [::]:8080")
    port = int(m["port"])
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return Listen(m["host"].strip("[]") or "0.0.0.0", port)


def parse_hosts(value: str) -> tuple[Listen, ...]:
    """`host:port,...` (Redis Sentinels): each with a host and a port."""
    hosts = []
    for item in value.split(","):
        if item.strip():
            m = _LISTEN_RE.match(item.strip())
            if not m or not m["host"].strip("[]") or not 0 < int(m["port"]) <= 65535:
                raise ValueError("must be HOST:PORT,HOST:PORT,... e.g. sentinel-1:26379")
            hosts.append(Listen(m["host"].strip("[]"), int(m["port"])))
    return tuple(hosts)


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    nets = []
    for item in value.split(","):
        item = item.strip()
        if item:
            nets.append(ipaddress.ip_network(item, strict=False))
    return tuple(nets)


# Query parameters that carry a password: libpq and asyncpg read `password` and `sslpassword`
# (the client key's passphrase) from a DSN's query, redis-py reads `password`; `passwd` is a
# common alias. Compared case-insensitively, after unescaping, so no spelling slips through.
_SECRET_PARAMS = frozenset({"password", "sslpassword", "passwd"})


def _redact_query(query: str) -> str:
    # Rewritten in place, parameter by parameter, so everything else stays byte for byte.
    out = []
    for param in query.split("&"):
        name, eq, _ = param.partition("=")
        if eq and unquote_plus(name).lower() in _SECRET_PARAMS:
            param = f"{name}=***"
        out.append(param)
    return "&".join(out)


def redact_url(url: str) -> str:
    """Replace the passwords of a DSN/URL with `***`, in the user info and in the query (the
    user name stays: it helps debugging)."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    # The query is cut out of the string rather than rebuilt with urlunsplit, which would
    # rewrite `unix:///path` as `unix:/path`.
    head, sep, tail = url.partition("?")
    query, hash_, fragment = tail.partition("#")
    return head + sep + _redact_query(query) + hash_ + fragment if sep else url


def _passwords_of(url: str) -> list[str]:
    """The passwords of a URL: in its user info (as written) and in its query."""
    userinfo = url.partition("://")[2].split("/", 1)[0].rpartition("@")[0]
    found = [userinfo.partition(":")[2]]
    found += [v for k, v in parse_qsl(url.partition("?")[2]) if k.lower() in _SECRET_PARAMS]
    return [p for p in found if p]


_TEXT_PARSERS: dict[str, Callable[[str], Any]] = {
    "listen": parse_listen,
    "ops_listen": parse_listen,
    "trusted_proxies": parse_networks,
    "scope_routes": parse_scope_routes,
    "public_routes": parse_public_routes,
    "redis_sentinels": parse_hosts,
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Listeners and upstream (SPEC 2, 6)
    listen: Annotated[Listen, NoDecode] = Listen("0.0.0.0", 8080)
    ops_listen: Annotated[Listen, NoDecode] = Listen("0.0.0.0", 9090)
    upstream_url: str | None = None
    upstream_host_header: str | None = None
    upstream_timeout: float = Field(300.0, gt=0)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_max_connections: int = Field(1000, ge=1)
    upstream_pool_timeout: float = Field(5.0, ge=0)
    upstream_client: Literal["lean", "aiohttp"] = "lean"
    websocket_max_message: int = Field(16 * 1024 * 1024, ge=1)
    trusted_proxies: Annotated[tuple[IPNetwork, ...], NoDecode] = parse_networks(
        "127.0.0.1/32,::1/128"
    )
    hide_credentials: bool = False
    shutdown_grace: float = Field(20.0, ge=0)

    # Hostile traffic (SPEC 15), main listener; the ops listener has fixed bounds.
    client_header_timeout: float = Field(10.0, gt=0)
    keepalive_timeout: float = Field(75.0, gt=0)
    client_body_timeout: float = Field(60.0, gt=0)
    max_client_connections: int = Field(10_000, ge=1)
    max_header_bytes: int = Field(32_768, ge=1024, le=1_048_576)
    token_filter: bool = True
    token_filter_miss_budget: float = Field(20.0, ge=0)
    token_filter_sql: str | None = None

    # Token store (SPEC 4)
    database_url: SecretStr
    # 0: no named prepared statements, for PgBouncer in transaction or statement pooling.
    database_statement_cache_size: int = Field(100, ge=0)
    # The connection that LISTENs; default: database_url. Must reach Postgres directly or
    # through session pooling (SPEC 3.5).
    database_listen_url: SecretStr | None = None
    # A hot-standby replica for token lookups; unknown tokens are re-checked on the primary,
    # writes and LISTEN always go to the primary (SPEC 3.5). Empty: lookups use the primary.
    database_read_url: SecretStr | None = None
    database_pool_size: int = Field(10, ge=1)
    database_timeout: float = Field(5.0, gt=0)
    token_hash: Literal["plain", "sha256"] = "plain"
    token_lookup_sql: str | None = None
    max_token_length: int = Field(512, ge=1, le=8192)

    # Routing (SPEC 3.2)
    scope_routes: Annotated[tuple[ScopeRoute, ...], NoDecode] = parse_scope_routes("/=app")
    public_routes: Annotated[tuple[PublicRoute, ...], NoDecode] = ()

    # Cache tiers (SPEC 3.3)
    redis_url: SecretStr | None = None
    local_cache_size: int = Field(100_000, ge=0)
    local_cache_ttl: float = Field(10.0, ge=0)
    cache_ttl: int = Field(600, ge=1)
    negative_cache_ttl: int = Field(60, ge=1)
    stale_if_error: int = Field(300, ge=0)
    redis_timeout: float = Field(0.5, gt=0)

    # Redis topologies (SPEC 3.5)
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_sentinels: Annotated[tuple[Listen, ...], NoDecode] = ()
    redis_sentinel_master: str = Field("mymaster", min_length=1)
    redis_sentinel_password: SecretStr | None = None
    redis_ca_file: str | None = None
    redis_cert_file: str | None = None
    redis_key_file: str | None = None

    # Invalidation (SPEC 3.4)
    notify_channel: str = Field("sidecar_invalidate", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    admin_token: SecretStr | None = None

    # Last-used tracking (SPEC 8)
    last_used_flush_interval: float = Field(10.0, gt=0)
    last_used_min_age: float = Field(60.0, ge=0)
    last_used_max_pending: int = Field(100_000, ge=1)
    # Where last_used_at is written; empty: not written at all (e.g. a custom lookup whose
    # table has no such column). Plain or schema-qualified identifiers only.
    last_used_table: str = Field(
        "api_tokens", pattern=r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?)?$"
    )

    # Rate limits (SPEC 9): off unless set
    rate_limit: Annotated[Rate | None, NoDecode] = None
    tenant_rate_limit: Annotated[Rate | None, NoDecode] = None
    rate_limit_fail_open: bool = True

    # Ops (SPEC 10, 13)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # One JSON line per request (SPEC 13): every request, only refused ones, or none (for
    # operators who log at the edge already).
    access_log: Literal["all", "denied", "off"] = "all"

    # Performance
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Plain bodyless decision requests answered without aiohttp's per-request machinery
    # (sidecar.fastpath); off: every request goes through aiohttp.
    decision_fast_path: bool = True

    @field_validator(*_TEXT_PARSERS, mode="before")
    @classmethod
    def _parse_text(cls, v: Any, info: ValidationInfo) -> Any:
        # These settings arrive from the environment as one comma-separated string.
        return _TEXT_PARSERS[str(info.field_name)](v) if isinstance(v, str) else v

    @field_validator("rate_limit", "tenant_rate_limit", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_rate(v) if v.strip() else None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("admin_token", mode="before")
    @classmethod
    def _admin(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if isinstance(raw, str) and len(raw.strip()) < 16:
            raise ValueError("must be at least 16 characters")
        return v

    @field_validator("upstream_url", "upstream_host_header", "token_lookup_sql",
                     "token_filter_sql", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("upstream_url")
    @classmethod
    def _upstream(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return v.rstrip("/")

    @field_validator("database_url", "database_listen_url", "database_read_url", mode="before")
    @classmethod
    def _dsn(cls, v: Any, info: ValidationInfo) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if info.field_name != "database_url" and (
                raw is None or (isinstance(raw, str) and not raw.strip())):
            return None
        if not isinstance(raw, str):
            raise ValueError("must be a postgresql:// URL")
        # Deliberately never echoes the value, nor any part of it: it may hold a password.
        check_postgres_url(raw)
        for password in _passwords_of(raw):
            register_secret(password)
        return v

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        check_redis_url(raw)  # its messages never echo the value
        return v

    @field_validator("redis_sentinel_password", mode="before")
    @classmethod
    def _optional_secret(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        return None if raw is None or (isinstance(raw, str) and not raw) else v

    @field_validator("redis_ca_file", "redis_cert_file", "redis_key_file", mode="before")
    @classmethod
    def _readable(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return check_readable_file(str(v).strip())

    @model_validator(mode="after")
    def _redis_topology(self) -> Settings:
        url = self.redis_url.get_secret_value() if self.redis_url is not None else None
        facts = url_facts(url) if url is not None else None
        if self.redis_mode == "sentinel" and not self.redis_sentinels:
            raise ValueError("SIDECAR_REDIS_SENTINELS is required with SIDECAR_REDIS_MODE=sentinel")
        if self.redis_mode != "sentinel" and self.redis_sentinels:
            raise ValueError("SIDECAR_REDIS_SENTINELS needs SIDECAR_REDIS_MODE=sentinel")
        if self.redis_mode == "cluster":
            if facts is None:
                raise ValueError("SIDECAR_REDIS_URL is required with SIDECAR_REDIS_MODE=cluster")
            if facts.scheme == "unix":
                raise ValueError("SIDECAR_REDIS_URL: a unix:// URL cannot reach a Redis Cluster")
            if facts.db != 0:
                raise ValueError("SIDECAR_REDIS_URL: Redis Cluster has only database 0")
        if facts is not None and facts.scheme == "unix" and self.redis_mode == "sentinel":
            raise ValueError("SIDECAR_REDIS_URL: with Sentinel, a redis:// or rediss:// URL "
                             "(its host is ignored)")
        tls_files = self.redis_ca_file or self.redis_cert_file or self.redis_key_file
        if tls_files and (facts is None or facts.scheme != "rediss"):
            raise ValueError("SIDECAR_REDIS_CA_FILE, _CERT_FILE and _KEY_FILE need a rediss:// "
                             "SIDECAR_REDIS_URL")
        if bool(self.redis_cert_file) != bool(self.redis_key_file):
            raise ValueError("SIDECAR_REDIS_CERT_FILE and SIDECAR_REDIS_KEY_FILE go together "
                             "(client certificate and its key)")
        return self

    @property
    def redis_enabled(self) -> bool:
        """Whether there is a shared tier: a URL, or Sentinels to ask for the master."""
        return self.redis_url is not None or self.redis_mode == "sentinel"

    @field_validator("event_loop")
    @classmethod
    def _loop(cls, v: str) -> str:
        if v == "uvloop" and not uvloop_installed():
            raise ValueError("uvloop is not installed (pip install apikey-sidecar[uvloop])")
        return v

    @model_validator(mode="after")
    def _lookup_sql(self) -> Settings:
        sql = self.token_lookup_sql
        if sql is not None and ("$1" not in sql or not sql.lstrip().lower().startswith("select")):
            raise ValueError("SIDECAR_TOKEN_LOOKUP_SQL must be a SELECT that uses $1 (and $2)")
        return self

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(r.scope for r in self.scope_routes)

    def redacted(self) -> dict[str, str]:
        """Effective settings as `SIDECAR_*` -> printable value, secrets redacted."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            key = ENV_PREFIX + name.upper()
            if name in ("database_url", "database_listen_url", "database_read_url",
                        "redis_url") and value is not None:
                out[key] = redact_url(value.get_secret_value())
            elif isinstance(value, SecretStr):
                out[key] = "***"
            elif isinstance(value, tuple):
                out[key] = ",".join(str(x) for x in value)
            elif value is None:
                out[key] = ""
            else:
                out[key] = str(value)
        return out


class SettingsError(Exception):
    """Every problem found in the configuration, one line each, secrets never included."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _variable(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "configuration"
    return ENV_PREFIX + str(loc[0]).upper()


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment (and .env); raise SettingsError listing every problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "is required"
            loc = err["loc"]
            if not loc and msg.startswith("Value error, SIDECAR_"):
                problems.append(msg.removeprefix("Value error, "))
                continue
            problems.append(f"{_variable(loc)}: {msg.removeprefix('Value error, ')}")
        raise SettingsError(problems) from None


def listen_dsn(settings: Settings) -> str:
    """Where the LISTEN connection goes (SIDECAR_DATABASE_LISTEN_URL, else the database)."""
    url = settings.database_listen_url or settings.database_url
    return url.get_secret_value()
