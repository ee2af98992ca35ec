"""A small circuit breaker: while a dependency is down, only one probe per back-off period.

Rule: `allow()` is cheap and synchronous, so the hot path can ask it before every call to the
dependency without awaiting anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.backoff import backoff_delay


class CircuitBreaker:
    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._retry_at = 0.0
        self._probing = False
        self._probe_started = 0.0

    @property
    def is_open(self) -> bool:
        return self._failures > 0

    def allow(self) -> bool:
        """True when a call may be made now: always while closed, one probe at a time when open."""
        if self._failures == 0:
            return True
        now = self._clock()
        # A probe whose caller vanished (cancelled) must not keep the circuit shut forever.
        if self._probing and now - self._probe_started < self.max_delay:
            return False
        if now < self._retry_at:
            return False
        self._probing = True
        self._probe_started = now
        return True

    def release(self) -> None:
        """The call ended without a verdict (cancelled): free the probe slot, change nothing."""
        self._probing = False

    def success(self) -> None:
        self._probing = False
        if self._failures:
            self._failures = 0
            if self._on_change:
                self._on_change(False)

    def failure(self) -> None:
        was_probe, self._probing = self._probing, False
        if self._failures and not was_probe:
            # A call that started before the circuit opened, failing late: no new information.
            # Escalating here would turn a one-second blip under load into a long outage.
            return
        self._failures += 1
        self._retry_at = self._clock() + backoff_delay(
            self._failures, base=self.base_delay, cap=self.max_delay)
        if self._failures == 1 and self._on_change:
            self._on_change(True)
