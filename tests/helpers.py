"""What tests share: polling, one raw HTTP/1.1 client, one way to read a metric.

* `within(seconds, check)` / `always(seconds, check)`: poll instead of sleeping.
* `raw_request(...)` / `exchange(port, parts)`: bytes no client library would send, on a new
  connection the server closes after answering; the answer parsed into a `RawResponse`.
* `sample(metrics, name, labels)`: a value of an in-process registry (0 when the series does
  not exist yet); `scrape(http, url)` / `scraped(text, name, labels)`: what a scraper reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from sidecar.metrics import Metrics
    from tests.conftest import Sidecar

Check = Callable[[], Awaitable[bool]]
Headers = Sequence[tuple[str, str]]


async def within(seconds: float, check: Check, *, interval: float = 0.02) -> float:
    """Poll `check` until true; return the time it took, fail after `seconds`."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            raise AssertionError(f"condition not met within {seconds}s")
        await asyncio.sleep(interval)


async def always(seconds: float, check: Check, *, interval: float = 0.05) -> None:
    """`check` must hold on every poll for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await check()
        await asyncio.sleep(interval)


IDENTITY = ("X-Tenant-Id", "X-App-Id", "X-Api-Token-Id", "X-Api-Token-Scope")


async def listening(*sidecars: Sidecar) -> None:
    """Until every subscription (LISTEN, SUBSCRIBE) of each sidecar is connected."""
    from sidecar.app import SUBSCRIPTIONS

    for sc in sidecars:
        for sub in sc.app[SUBSCRIPTIONS]:
            await asyncio.wait_for(sub.connected.wait(), 10)


async def status(http: aiohttp.ClientSession, sc: Sidecar, token: str, path: str = "/a") -> int:
    """The status of one GET with the token, through a sidecar's main listener."""
    async with http.get(sc.url(path), headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r.status


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def identity(self) -> dict[str, str]:
        """The identity headers (SPEC 5) the response carries."""
        return {h: self.headers[h] for h in IDENTITY if h in self.headers}


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2:]
    return bytes(out)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(int(status_line.split()[1]), parsed, body)


async def exchange(port: int | None, parts: Sequence[bytes], *, pause: float = 0.0,
                   timeout: float = 10.0) -> RawResponse:
    """Write `parts` (with `pause` seconds between them, so the server sees separate TCP
    segments), read until the server closes, parse the answer."""
    return parse_response(await exchange_bytes(port, parts, pause=pause, timeout=timeout))


async def exchange_bytes(port: int | None, parts: Sequence[bytes], *, pause: float = 0.0,
                         timeout: float = 10.0, reset_ok: bool = False) -> bytes:
    """`exchange`'s bytes, unparsed (several responses, for pipelined requests).
    `reset_ok`: a server that answers and closes before the last part (a 431) resets the
    connection; what it sent before the reset is still returned."""
    assert port is not None, "server not started"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        try:
            for index, part in enumerate(parts):
                if index and pause:
                    await asyncio.sleep(pause)
                writer.write(part)
                await writer.drain()
        except ConnectionError:
            if not reset_ok:
                raise
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    data += chunk
        except ConnectionError:
            if not reset_ok:
                raise
    finally:
        writer.close()
    return data


async def raw_request(
    port: int | None, method: str, target: str, headers: Headers = (), *, body: bytes = b"",
    timeout: float = 10.0,
) -> RawResponse:
    """One HTTP/1.1 request with exactly this target and these header lines."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return await exchange(port, [head + body], timeout=timeout)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of an in-process registry; 0 for a series that does not exist (yet)."""
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, Metric]:
    """The metric families of a /metrics endpoint, parsed as Prometheus would."""
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return families(await resp.text())


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def scraped(found: dict[str, Metric], name: str, labels: dict[str, str] | None = None
            ) -> float:
    """The value of one sample (`name` with exactly `labels`) of scraped families."""
    for family in found.values():
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    raise AssertionError(f"{name}{labels or ''} not in /metrics")
