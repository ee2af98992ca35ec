from __future__ import annotations

import pytest

from sidecar.rate import Rate, parse_rate
from sidecar.ratelimit import LocalLimiter


@pytest.mark.parametrize(("text", "rate"), [
    ("100/s", Rate(100, 1.0)), ("6000/m", Rate(6000, 60.0)), ("10/5m", Rate(10, 300.0)),
    ("1000/hour", Rate(1000, 3600.0)), (" 5 / sec ", Rate(5, 1.0)),
])
def test_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "100", "0/s", "10/0s", "10/d", "-1/s", "x/s"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"COUNT/PERIOD|period"):
        parse_rate(text)


def test_gcra_burst_then_steady_rate() -> None:
    now = [100.0]
    lim = LocalLimiter(clock=lambda: now[0])
    rate = Rate(5, 1.0)
    verdicts = [lim.check(["k"], [rate]) for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    limited = verdicts[5]
    assert limited.headers()["Retry-After"] == "1"
    assert limited.retry_after == pytest.approx(0.2)
    assert limited.headers()["RateLimit-Limit"] == "5"
    assert limited.headers()["RateLimit-Remaining"] == "0"
    now[0] += 0.2  # one emission interval later: exactly one more
    assert lim.check(["k"], [rate]).allowed
    assert not lim.check(["k"], [rate]).allowed
    now[0] += 1.0  # a whole period: the full burst again
    assert sum(lim.check(["k"], [rate]).allowed for _ in range(10)) == 5


def test_all_limits_must_allow_and_the_tightest_speaks() -> None:
    now = [0.0]
    lim = LocalLimiter(clock=lambda: now[0])
    token, tenant = Rate(10, 1.0), Rate(3, 1.0)
    results = [lim.check(["tok:a", "ten:t"], [token, tenant]) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert results[0].limit == 3  # the tenant limit has fewer remaining
    # A refused request is not counted against the looser limit either.
    assert lim.check(["tok:a"], [token]).remaining == 6
