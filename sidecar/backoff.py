"""The one back-off of the sidecar: how long to wait after consecutive failures of a
dependency (Redis probes, LISTEN/SUBSCRIBE reconnects, last-used flush retries).

Rules that hold here:
1. The delay doubles from `base` up to `cap`. Jitter only shortens it (by up to a quarter),
   so `cap` is a true upper bound and consecutive delays still grow until it is reached
   (0.75 * 2d > d). Jitter keeps replicas that lost a dependency together from retrying in
   step.
2. Pure arithmetic; no clock, no sleeping: callers decide what waiting means.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    failures: int,
    *,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after `failures` consecutive failures (failures >= 1)."""
    # The exponent is clamped: 2.0 ** 1024 overflows and a long outage must not crash a loop.
    delay = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 60))
    return delay * (0.75 + 0.25 * rand())


class Backoff:
    """A failure counter with `backoff_delay` for loops that reconnect."""

    def __init__(self, *, base: float, cap: float) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next_delay(self) -> float:
        self.failures += 1
        return backoff_delay(self.failures, base=self.base, cap=self.cap)

    def reset(self) -> None:
        self.failures = 0
