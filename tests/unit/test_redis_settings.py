"""Redis topology settings (SPEC 3.5): every wrong combination is one named problem, and no
message carries a password."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sidecar.redisclient import describe
from sidecar.settings import Listen, SettingsError, load_settings

DSN = "postgresql://user@db:5432/app"
SECRET = "r3dis-Secret-pw"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("SIDECAR_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env


def problems(**settings: Any) -> list[str]:
    with pytest.raises(SettingsError) as err:
        load_settings(database_url=DSN, **settings)
    for problem in err.value.problems:
        assert SECRET not in problem
    return err.value.problems


def test_sentinel_settings_parse() -> None:
    s = load_settings(database_url=DSN, redis_mode="sentinel",
                      redis_sentinels="s1:26379, 10.0.0.2:26380",
                      redis_sentinel_password=SECRET,
                      redis_url=f"redis://:{SECRET}@ignored:6379/2")
    assert s.redis_sentinels == (Listen("s1", 26379), Listen("10.0.0.2", 26380))
    assert s.redis_enabled
    shown = s.redacted()
    assert shown["SIDECAR_REDIS_SENTINELS"] == "s1:26379,10.0.0.2:26380"
    assert shown["SIDECAR_REDIS_SENTINEL_PASSWORD"] == "***"
    assert SECRET not in str(shown)
    # Sentinel without a URL: no credentials, still a shared tier.
    assert load_settings(database_url=DSN, redis_mode="sentinel",
                         redis_sentinels="s1:26379").redis_enabled
    assert not load_settings(database_url=DSN).redis_enabled


@pytest.mark.parametrize(("settings", "named"), [
    ({"redis_mode": "sentinel"}, "SIDECAR_REDIS_SENTINELS"),
    ({"redis_mode": "sentinel", "redis_sentinels": "s1"}, "SIDECAR_REDIS_SENTINELS"),
    ({"redis_sentinels": "s1:26379"}, "SIDECAR_REDIS_MODE=sentinel"),
    ({"redis_mode": "cluster"}, "SIDECAR_REDIS_URL is required"),
    ({"redis_mode": "cluster", "redis_url": f"unix:///run/r.sock?password={SECRET}"},
     "SIDECAR_REDIS_URL: a unix:// URL"),
    ({"redis_mode": "cluster", "redis_url": f"redis://:{SECRET}@h:6379/3"},
     "only database 0"),
    ({"redis_mode": "nonsense"}, "SIDECAR_REDIS_MODE"),
    ({"redis_url": f"redis://:{SECRET}@h:6379/0", "redis_ca_file": "/no/such/ca.pem"},
     "SIDECAR_REDIS_CA_FILE: no such file: /no/such/ca.pem"),
])
def test_wrong_combinations_are_named(settings: dict[str, Any], named: str) -> None:
    found = problems(**settings)
    assert len(found) == 1, found
    assert named in found[0]


def test_tls_files_need_rediss_and_go_in_pairs(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    plain = f"redis://:{SECRET}@h:6379/0"
    tls = f"rediss://:{SECRET}@h:6380/0"
    assert "rediss://" in problems(redis_url=plain, redis_ca_file=str(pem))[0]
    assert "go together" in problems(redis_url=tls, redis_cert_file=str(pem))[0]
    s = load_settings(database_url=DSN, redis_url=tls, redis_ca_file=str(pem),
                      redis_cert_file=str(pem), redis_key_file=str(pem))
    assert s.redis_ca_file == str(pem)
    if os.geteuid() != 0:  # root reads anything
        pem.chmod(0)
        assert "not readable" in problems(redis_url=tls, redis_ca_file=str(pem))[0]


@pytest.mark.parametrize("url", [
    f"redis://:pa/{SECRET}@h:6379/0",
    f"redis://u:p@{SECRET}@h:6379/0",
    f"redis://:{SECRET}@h1:6379,h2:6379/0",
    f"redis://:{SECRET}@h:99999/0",
    f"redis://:{SECRET}@h:0/0",
    f"redis://:{SECRET}@h:6379/zero",
    f"redis://:{SECRET}@h:6379/0#{SECRET}",
    f"redis://:{SECRET}@[::1/0",
    f"redis://:{SECRET}@h:6379/0?socket_timeout=x{SECRET}",
    "unix://",
    f"http://:{SECRET}@h",
])
def test_malformed_urls_are_one_named_problem(url: str) -> None:
    found = problems(redis_url=url)
    assert len(found) == 1, found
    assert found[0].startswith("SIDECAR_REDIS_URL: "), found


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://h", "rediss://user:p%40ss%2F%3A@h.example:6380/2",
    "redis://[::1]:6379/0", "unix:///run/redis.sock?db=1", "redis://:pw:with:colons@h:1/0",
])
def test_ordinary_urls_pass(url: str) -> None:
    assert load_settings(database_url=DSN, redis_url=url).redis_url is not None


def test_describe_scrubs_passwords() -> None:
    exc = ConnectionError(f"could not AUTH with {SECRET} at h:1")
    assert describe(exc, [SECRET]) == "ConnectionError: could not AUTH with *** at h:1"
    assert describe(TimeoutError()) == "TimeoutError"
