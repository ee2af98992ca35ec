"""`sidecar healthcheck`: ask this host's own ops listener for `/healthz` (the image's
HEALTHCHECK, which runs inside the container next to `sidecar serve`).

Rules that hold here:
1. The address is SIDECAR_OPS_LISTEN as Settings parses it for `sidecar serve` (environment
   and `.env`), so the check follows the setting, IPv6 included.
2. A wildcard bind address is dialled on the loopback of its own family (`0.0.0.0` ->
   127.0.0.1, `::` -> ::1): a listener bound to `[::]` may not accept IPv4. Any other address
   is dialled as it is.
3. Healthy is a 200 from `/healthz` within the timeout, nothing else. No dependency is asked
   (that is `/readyz`): a restart would not bring Postgres back.
"""

from __future__ import annotations

import http.client

from sidecar.settings import Listen

HEALTHZ = "/healthz"
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def probe_address(listen: Listen) -> tuple[str, int]:
    """Where to dial to reach a listener bound to `listen` from the same host (rule 2)."""
    return _LOOPBACK.get(listen.host, listen.host), listen.port


def check(listen: Listen, timeout: float) -> str | None:
    """None when healthy, else why not (one line, nothing secret in it)."""
    if listen.port == 0:
        return "SIDECAR_OPS_LISTEN has port 0: the listener's port cannot be known"
    host, port = probe_address(listen)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    where = f"{Listen(host, port)}{HEALTHZ}"
    try:
        conn.request("GET", HEALTHZ)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"{where}: {type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return None if status == 200 else f"{where}: status {status}"
