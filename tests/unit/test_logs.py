from __future__ import annotations

import logging
import sys

import orjson

from sidecar.logs import JsonFormatter


def test_errors_log_where_but_not_the_message() -> None:
    secret = "app-secret-token-in-a-driver-message"
    try:
        raise ValueError(f"invalid input syntax: {secret}")
    except ValueError:
        record = logging.LogRecord("sidecar.gate", logging.ERROR, __file__, 1,
                                   "unhandled error", None, sys.exc_info())
    line = JsonFormatter().format(record)
    doc = orjson.loads(line)
    assert doc["msg"] == "unhandled error"
    assert doc["exc_type"] == "ValueError"
    assert any("test_errors_log_where_but_not_the_message" in f for f in doc["exc_frames"])
    assert secret not in line


def test_fields_are_merged() -> None:
    record = logging.LogRecord("sidecar", logging.INFO, __file__, 1, "access", None, None)
    record.fields = {"status": 200, "token_id": "row-1"}
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["status"] == 200
    assert doc["token_id"] == "row-1"
    assert doc["level"] == "info"
