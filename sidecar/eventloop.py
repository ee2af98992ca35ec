"""Which asyncio event loop runs the sidecar (SIDECAR_EVENT_LOOP=auto|uvloop|asyncio).

uvloop (an optional dependency: `pip install apikey-sidecar[uvloop]`) parses nothing of ours
differently; it only runs the same callbacks with less overhead per socket operation, which on
the decision endpoint is most of the cost. `auto` takes it when it is installed, so an image
built with the extra gets it without a setting, and one built without still starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
T = TypeVar("T")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> Literal["uvloop", "asyncio"]:
    """The loop `choice` means on this machine; `uvloop` without uvloop is an error (a setting
    that cannot work fails at start, Settings checks it too)."""
    if choice == "asyncio":
        return "asyncio"
    if choice not in ("auto", "uvloop"):
        raise ValueError(f"unknown event loop {choice!r}")
    if uvloop_installed():
        return "uvloop"
    if choice == "uvloop":
        raise RuntimeError("SIDECAR_EVENT_LOOP=uvloop but uvloop is not installed")
    return "asyncio"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None  # asyncio's default


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
