"""A rate limit as configured (`100/s`, `6000/m`): a value object, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.I)
_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                 "h": 3600, "hour": 3600}


@dataclass(frozen=True, slots=True)
class Rate:
    limit: int
    period: float  # seconds

    def __str__(self) -> str:
        return f"{self.limit}/{self.period:g}s"

    @property
    def interval(self) -> float:
        return self.period / self.limit

    @property
    def tolerance(self) -> float:
        return self.period - self.interval  # a burst of `limit` requests


def parse_rate(value: str) -> Rate:
    """`100/s`, `6000/m`, `10/5m`, `1000/hour`."""
    m = _RATE_RE.match(value)
    if not m or int(m[1]) < 1:
        raise ValueError("must be COUNT/PERIOD, e.g. 100/s, 6000/m, 50000/h")
    period = (int(m[2]) if m[2] else 1) * _UNIT_SECONDS[m[3].lower()]
    if period < 1:
        raise ValueError("the period must be at least one second")
    return Rate(int(m[1]), float(period))
