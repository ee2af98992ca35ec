"""JSON-lines logging (SPEC 13).

Rules that hold here:
1. Every line is one JSON object. Values that are looked up or filtered on (request facts in
   the access line, peers, addresses, header names) are structured fields
   (`extra={"fields": {...}}`); counts, durations and error class names may also be
   formatted into the message text of operational lines, which are read by people.
2. Nothing here ever reads a request's Authorization header, and exception messages are not
   copied (only the class and frames), so no token can reach a log line through this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from sidecar.outcomes import Outcome
from sidecar.request_info import info_of


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # Where it failed, but not the exception's message: driver messages can quote
            # the values involved, and a token must never reach a log line.
            doc["exc_type"] = record.exc_info[0].__name__
            frames = traceback.extract_tb(record.exc_info[2])[-8:]
            doc["exc_frames"] = [f"{f.filename}:{f.lineno} {f.name}" for f in frames]
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp logs a traceback with request details for handler errors; keep its level sane.
    logging.getLogger("aiohttp.access").setLevel(level)


# A batch is written at the latest this long after its first line, or once it is this big.
ACCESS_FLUSH_INTERVAL = 0.2
ACCESS_BUFFER_BYTES = 64 * 1024
# Outcomes that are not a refusal: `SIDECAR_ACCESS_LOG=denied` leaves them out.
_LET_THROUGH = frozenset({Outcome.ALLOWED, Outcome.PUBLIC})


class AccessLog:
    """The access lines (SPEC 13), one JSON object per request, same fields as every other
    line (ts, level, logger, pid, msg) plus the request's.

    Built with orjson directly and appended to a buffer: no LogRecord, no Formatter and no
    write per request, which cost more than the decision itself. The buffer is written when
    it is `ACCESS_BUFFER_BYTES` big, `ACCESS_FLUSH_INTERVAL` after its first line, and by
    `close()` at shutdown, so a SIGTERM loses nothing. Writes are whole lines, so they never
    interleave mid-line with the logging module's lines on the same stream.
    """

    def __init__(self, stream: BinaryIO, *, only_denied: bool = False,
                 flush_interval: float = ACCESS_FLUSH_INTERVAL) -> None:
        self.stream = stream
        self.only_denied = only_denied
        self.flush_interval = flush_interval
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._pid = os.getpid()
        self._second = -1
        self._ts_prefix = ""
        self._millis = -1
        self._ts_text = ""

    def _ts(self, now: float) -> str:
        # The same text as JsonFormatter's isoformat(timespec="milliseconds"), with the
        # date part formatted once per second and the whole once per millisecond (under
        # load, several lines share one).
        millis = int(now * 1000)
        if millis == self._millis:
            return self._ts_text
        second = millis // 1000
        if second != self._second:
            self._second = second
            self._ts_prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self._millis = millis
        self._ts_text = f"{self._ts_prefix}.{millis % 1000:03d}+00:00"
        return self._ts_text

    def log(self, request: BaseRequest, response: StreamResponse, seconds: float) -> None:
        info = info_of(request)
        if self.only_denied and info.outcome in _LET_THROUGH:
            return
        self._buffer += orjson.dumps({
            "ts": self._ts(time.time()),
            "level": "info",
            "logger": "aiohttp.access",
            "pid": self._pid,
            "msg": "access",
            "method": request.method,
            "path": request.path,
            "judged_path": info.judged_path,
            "status": response.status,
            "scope": info.scope,
            "outcome": info.outcome,
            "token_id": info.token_id,
            "tenant_id": info.tenant_id,
            "latency_ms": round(seconds * 1000, 3),
            "upstream_ms": info.upstream_ms,
            "request_id": info.request_id,
            "remote": request.remote,
        }, option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buffer) >= ACCESS_BUFFER_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop (never in the server): write at once
                self.flush()
                return
            self._timer = loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        # Blocking, like every log line: a stdout nobody reads must slow the sidecar down,
        # not make it drop or hold unbounded lines. It happens once per batch, not per request.
        self.stream.write(data)
        self.stream.flush()

    def close(self) -> None:
        self.flush()


def access_logger_class(access_log: AccessLog) -> type[AbstractAccessLogger]:
    """The `access_log_class` for aiohttp's AppRunner, writing to `access_log` (aiohttp makes
    one instance per connection, hence a class bound to the one AccessLog)."""

    class AccessLogger(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            access_log.log(request, response, time)

    return AccessLogger


def stdout_access_log(mode: str) -> AccessLog | None:
    """The process's access log for SIDECAR_ACCESS_LOG, or None for `off`."""
    if mode == "off":
        return None
    return AccessLog(sys.stdout.buffer, only_denied=mode == "denied")
