"""Where `sidecar healthcheck` dials (pure logic; the probe itself is tested on a real
`sidecar serve` in tests/functional/test_healthcheck.py)."""

from __future__ import annotations

import pytest

from sidecar.healthcheck import check, probe_address
from sidecar.settings import parse_listen


@pytest.mark.parametrize(("setting", "expected"), [
    ("0.0.0.0:9090", ("127.0.0.1", 9090)),
    (":9090", ("127.0.0.1", 9090)),  # an empty host binds every IPv4 address
    ("[::]:9091", ("::1", 9091)),
    ("[::1]:9090", ("::1", 9090)),
    ("127.0.0.2:80", ("127.0.0.2", 80)),
    ("10.1.2.3:9090", ("10.1.2.3", 9090)),
    ("[fd00::7]:9090", ("fd00::7", 9090)),
    ("localhost:9090", ("localhost", 9090)),
])
def test_wildcards_are_dialled_on_their_loopback(setting: str, expected: tuple[str, int]) -> None:
    assert probe_address(parse_listen(setting)) == expected


def test_port_zero_is_never_healthy() -> None:
    problem = check(parse_listen("127.0.0.1:0"), 1.0)
    assert problem is not None
    assert "port 0" in problem
