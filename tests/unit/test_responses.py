"""The error table (sidecar.responses rule 1): every domain error has a row."""

from __future__ import annotations

import importlib
import pkgutil

import orjson
import pytest

import sidecar
from sidecar.errors import (
    AuthUnavailable,
    InvalidToken,
    RateLimited,
    SidecarError,
    UndescribedRequest,
)
from sidecar.outcomes import Outcome
from sidecar.responses import error_response, outcome_of, row_for


def _all_subclasses(cls: type[SidecarError]) -> set[type[SidecarError]]:
    found: set[type[SidecarError]] = set()
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found and sub.__module__.startswith("sidecar."):
                found.add(sub)
                todo.append(sub)
    return found


def unmapped() -> set[type[SidecarError]]:
    # Import every module: an error class defined anywhere in the package must be mapped.
    for mod in pkgutil.iter_modules(sidecar.__path__):
        if mod.name != "__main__":
            importlib.import_module(f"sidecar.{mod.name}")
    return {cls for cls in _all_subclasses(SidecarError) if row_for(cls) is None}


def test_every_sidecar_error_has_a_row() -> None:
    assert len(_all_subclasses(SidecarError)) >= 15
    assert unmapped() == set()


def test_an_error_without_a_row_is_found() -> None:
    # The check above can fail: a new direct subclass of SidecarError has no row until one
    # is added to the table (defined under a sidecar module name, as the walk requires).
    orphan = type("Orphan", (SidecarError,), {"__module__": "sidecar.orphan"})
    try:
        assert unmapped() == {orphan}
    finally:
        del orphan
        import gc
        gc.collect()


@pytest.mark.parametrize(("exc", "status", "code", "outcome", "header"), [
    (InvalidToken(), 401, "unauthorized", Outcome.UNAUTHORIZED, "WWW-Authenticate"),
    (AuthUnavailable(), 503, "auth_unavailable", Outcome.UNAVAILABLE, "Retry-After"),
    (RateLimited({"Retry-After": "3"}), 429, "too_many_requests", Outcome.RATE_LIMITED,
     "Retry-After"),
    (UndescribedRequest(()), 400, "bad_request", Outcome.BAD_REQUEST, None),
])
def test_rows_give_status_code_outcome_and_headers(
    exc: SidecarError, status: int, code: str, outcome: Outcome, header: str | None
) -> None:
    response = error_response(exc)
    assert response.status == status
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    assert orjson.loads(response.body) == {"code": code, "message": exc.message,
                                           "status": status}
    assert outcome_of(exc) is outcome
    if header is not None:
        assert header in response.headers
