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

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

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


class AccessLogger(AbstractAccessLogger):
    """One line per request with what the sidecar decided; never the token or its header."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        info = info_of(request)
        self.logger.info(
            "access",
            extra={"fields": {
                "method": request.method,
                "path": request.path,
                "judged_path": info.judged_path,
                "status": response.status,
                "scope": info.scope,
                "outcome": info.outcome,
                "token_id": info.token_id,
                "tenant_id": info.tenant_id,
                "latency_ms": round(time * 1000, 3),
                "upstream_ms": info.upstream_ms,
                "request_id": info.request_id,
                "remote": request.remote,
            }},
        )
