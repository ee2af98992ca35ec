from __future__ import annotations

import ipaddress

import pytest

from sidecar.routing import PublicRoute, ScopeRoute
from sidecar.settings import Listen, SettingsError, load_settings, redact_url

DSN = "postgresql://user:hunter2-password@db:5432/app"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SIDECAR_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(str(tmp_path))  # no stray .env


def test_defaults_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", DSN)
    monkeypatch.setenv("SIDECAR_LISTEN", "[::1]:8081")
    monkeypatch.setenv("SIDECAR_SCOPE_ROUTES", "/v1/datasets=dataset, /=app")
    monkeypatch.setenv("SIDECAR_PUBLIC_ROUTES", "GET /health,/public/")
    monkeypatch.setenv("SIDECAR_TRUSTED_PROXIES", "10.0.0.0/8")
    monkeypatch.setenv("SIDECAR_UPSTREAM_URL", "http://127.0.0.1:5001/")
    monkeypatch.setenv("SIDECAR_LOG_LEVEL", "debug")
    s = load_settings()
    assert s.listen == Listen("::1", 8081)
    assert str(s.listen) == "[::1]:8081"
    assert s.ops_listen == Listen("0.0.0.0", 9090)
    assert s.scope_routes == (ScopeRoute("/v1/datasets", "dataset"), ScopeRoute("/", "app"))
    assert s.public_routes == (PublicRoute(None, "/public/"), PublicRoute("GET", "/health"))
    assert s.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert s.upstream_url == "http://127.0.0.1:5001"
    assert s.log_level == "DEBUG"
    assert s.cache_ttl == 600
    assert s.negative_cache_ttl == 60
    assert s.stale_if_error == 300
    assert s.local_cache_size == 100_000
    assert s.scopes == frozenset({"dataset", "app"})


def test_every_problem_is_reported_by_variable_without_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIDECAR_CACHE_TTL", "abc")
    monkeypatch.setenv("SIDECAR_UPSTREAM_URL", "ftp://x")
    monkeypatch.setenv("SIDECAR_TOKEN_HASH", "md5")
    monkeypatch.setenv("SIDECAR_REDIS_URL", "http://:redis-pw@host")
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", "short")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    text = "\n".join(exc.value.problems)
    for var in ("SIDECAR_DATABASE_URL", "SIDECAR_CACHE_TTL", "SIDECAR_UPSTREAM_URL",
                "SIDECAR_TOKEN_HASH", "SIDECAR_REDIS_URL", "SIDECAR_ADMIN_TOKEN"):
        assert var in text
    assert len(exc.value.problems) == 6
    assert "redis-pw" not in text
    assert "short" not in text.replace("SIDECAR_", "")


def test_redacted_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", DSN)
    monkeypatch.setenv("SIDECAR_REDIS_URL", "redis://:redis-pw@127.0.0.1:6379/0")
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", "admin-token-0123456789")
    monkeypatch.setenv("SIDECAR_DATABASE_LISTEN_URL", "postgresql://u:listen-pw@db:5432/app")
    out = load_settings().redacted()
    joined = "\n".join(f"{k}={v}" for k, v in out.items())
    assert "listen-pw" not in joined
    assert out["SIDECAR_DATABASE_LISTEN_URL"] == "postgresql://u:***@db:5432/app"
    assert "hunter2-password" not in joined
    assert "redis-pw" not in joined
    assert "admin-token-0123456789" not in joined
    assert out["SIDECAR_DATABASE_URL"] == "postgresql://user:***@db:5432/app"
    assert out["SIDECAR_ADMIN_TOKEN"] == "***"


@pytest.mark.parametrize(("var", "value"), [
    ("SIDECAR_SCOPE_ROUTES", "v1=app"),
    ("SIDECAR_SCOPE_ROUTES", "/=app,/=dataset"),
    ("SIDECAR_SCOPE_ROUTES", "/=" + "x" * 17),
    ("SIDECAR_PUBLIC_ROUTES", "GET POST /x"),
    ("SIDECAR_TRUSTED_PROXIES", "not-an-ip"),
    ("SIDECAR_LISTEN", "8080"),
    ("SIDECAR_NOTIFY_CHANNEL", "bad channel"),
    ("SIDECAR_TOKEN_LOOKUP_SQL", "DELETE FROM api_tokens"),
    ("SIDECAR_WEBSOCKET_MAX_MESSAGE", "0"),
    ("SIDECAR_UPSTREAM_POOL_TIMEOUT", "-1"),
    ("SIDECAR_DATABASE_LISTEN_URL", "mysql://u:p@h/db"),
    ("SIDECAR_DATABASE_STATEMENT_CACHE_SIZE", "-1"),
])
def test_invalid_values(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", DSN)
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert var in "\n".join(exc.value.problems)


def test_redact_url() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"


@pytest.mark.parametrize(("url", "expected"), [
    # libpq/asyncpg take the password (and the client key's passphrase) as query parameters too.
    ("postgresql://u@h/db?password=S3cret", "postgresql://u@h/db?password=***"),
    ("postgresql://u@h/db?sslmode=require&sslpassword=K3y&application_name=x",
     "postgresql://u@h/db?sslmode=require&sslpassword=***&application_name=x"),
    ("postgresql://u:p@h/db?passwd=S3cret&user=u", "postgresql://u:***@h/db?passwd=***&user=u"),
    ("postgresql://u@h/db?PASSWORD=S3cret", "postgresql://u@h/db?PASSWORD=***"),
    ("postgresql://u@h/db?pass%77ord=S3cret", "postgresql://u@h/db?pass%77ord=***"),
    ("postgresql://u@h/db?password=a&password=b", "postgresql://u@h/db?password=***&password=***"),
    ("postgresql://u@h/db?password", "postgresql://u@h/db?password"),  # nothing to hide
    ("redis://h:6379/0?password=S3cret&db=1", "redis://h:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?password=S3cret", "unix:///run/redis.sock?password=***"),
    # Everything else is left exactly as written, escapes included.
    ("postgresql://u@h/db?options=-c%20search_path%3Dx&sslmode=require",
     "postgresql://u@h/db?options=-c%20search_path%3Dx&sslmode=require"),
])
def test_redact_url_hides_passwords_in_the_query(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redacted_hides_query_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", "postgresql://u@db/app?password=pg-query-pw")
    monkeypatch.setenv("SIDECAR_REDIS_URL", "redis://127.0.0.1:6379/0?password=redis-query-pw")
    out = load_settings().redacted()
    assert out["SIDECAR_DATABASE_URL"] == "postgresql://u@db/app?password=***"
    assert out["SIDECAR_REDIS_URL"] == "redis://127.0.0.1:6379/0?password=***"


def test_proxy_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", DSN)
    s = load_settings()
    assert s.websocket_max_message == 16 * 1024 * 1024
    assert s.upstream_pool_timeout == 5.0
    monkeypatch.setenv("SIDECAR_WEBSOCKET_MAX_MESSAGE", "1")
    monkeypatch.setenv("SIDECAR_UPSTREAM_POOL_TIMEOUT", "0")
    s = load_settings()
    assert s.websocket_max_message == 1
    assert s.upstream_pool_timeout == 0
