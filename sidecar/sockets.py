"""The listening sockets, bound before anything else starts.

Rule: an address that cannot be bound (in use, not ours, unresolvable) is found before any
connection pool, subscription or task exists, so `serve` exits at once with one line naming
the address and the setting, instead of starting half a sidecar that has to be torn down.
"""

from __future__ import annotations

import socket

from sidecar.settings import Listen


class BindError(Exception):
    def __init__(self, setting: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")
        self.setting, self.address, self.reason = setting, address, reason


def bind(setting: str, listen: Listen, *, backlog: int, reuse_port: bool) -> socket.socket:
    try:
        family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((listen.host, listen.port), family=family,
                                    backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise BindError(setting, str(listen), exc.strerror or str(exc)) from None
