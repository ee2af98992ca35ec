from __future__ import annotations

import ipaddress

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.headers import (
    downstream_response_headers,
    is_identity,
    upstream_request_headers,
)
from sidecar.models import Identity
from sidecar.trust import peer_trusted

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


def proxy(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_identity_names_in_every_spelling() -> None:
    for name in ("X-Tenant-Id", "x-tenant-id", "X_Tenant_Id", "X-API-TOKEN-SCOPE",
                 "x_api_token_id", "X-App_Id", "X.Tenant.Id", "X~App~Id"):
        assert is_identity(name)
    assert not is_identity("X-Tenant")


def test_upstream_headers() -> None:
    ident = Identity("tid", "ten", "", "app")
    out = upstream_request_headers(
        proxy([("Host", "api.example"), ("Connection", "keep-alive, X-Drop"), ("X-Drop", "1"),
               ("Keep-Alive", "300"), ("Transfer-Encoding", "chunked"), ("X_Tenant_Id", "evil"),
               ("x-app-id", "evil"), ("Authorization", "Bearer t"), ("X-Keep", "a"),
               ("X-Keep", "b"), ("X-Forwarded-For", "1.2.3.4"), ("Forwarded", "for=1.2.3.4")]),
        peer="127.0.0.1", trusted=False, scheme="http", identity=ident,
        hide_credentials=True, host_override="internal:5001", request_id="rid",
    )
    assert out.getall("X-Keep") == ["a", "b"]
    for dropped in ("Connection", "X-Drop", "Keep-Alive", "Transfer-Encoding", "Authorization",
                    "Forwarded", "X_Tenant_Id"):
        assert dropped not in out
    assert out["X-Forwarded-For"] == "127.0.0.1"
    assert out["X-Forwarded-Host"] == "api.example"
    assert out["Host"] == "internal:5001"
    assert out.getall("X-Tenant-Id") == ["ten"]
    assert out.getall("X-App-Id") == [""]
    assert out["X-Request-Id"] == "rid"


def test_response_headers_drop_hop_by_hop_only() -> None:
    out = downstream_response_headers(proxy([
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Connection", "close"),
        ("Transfer-Encoding", "chunked"), ("Content-Type", "text/plain")]))
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "Connection" not in out
    assert "Transfer-Encoding" not in out
    assert out["Content-Type"] == "text/plain"


def test_peer_trust() -> None:
    assert peer_trusted("127.0.0.1", LOOPBACK)
    assert peer_trusted("::ffff:127.0.0.1", LOOPBACK)
    assert peer_trusted("::1", LOOPBACK)
    assert not peer_trusted("10.0.0.1", LOOPBACK)
    assert not peer_trusted(None, LOOPBACK)
    assert not peer_trusted("garbage", LOOPBACK)
