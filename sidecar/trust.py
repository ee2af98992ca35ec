"""Which peers may describe a request for us (SPEC 6: `SIDECAR_TRUSTED_PROXIES`).

Rule: a peer is trusted only when its address parses and lies in a configured network; an
IPv4-mapped IPv6 peer (`::ffff:127.0.0.1`, seen on dual-stack sockets) is judged as IPv4.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parsed once per distinct peer: this runs for every request."""
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def peer_trusted(peer: str | None, trusted: Iterable[IPNetwork]) -> bool:
    addr = _address(peer) if peer else None
    return addr is not None and any(addr in net for net in trusted)
