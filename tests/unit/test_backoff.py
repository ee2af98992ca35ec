"""The one back-off (sidecar.backoff)."""

from __future__ import annotations

from sidecar.backoff import Backoff, backoff_delay


def test_delay_grows_is_capped_and_jittered() -> None:
    lo = [backoff_delay(n, base=1.0, cap=60.0, rand=lambda: 0.0) for n in range(1, 10)]
    hi = [backoff_delay(n, base=1.0, cap=60.0, rand=lambda: 1.0) for n in range(1, 10)]
    assert hi[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert lo[0] == 0.75
    # Even with the worst jitter, the next delay is longer until the cap is reached.
    for n in range(5):
        assert lo[n + 1] > hi[n]
    assert max(hi) == 60.0
    assert backoff_delay(10_000, base=1.0, cap=60.0) <= 60.0  # no float overflow


def test_backoff_counts_failures_and_resets() -> None:
    b = Backoff(base=0.2, cap=10.0)
    first = b.next_delay()
    assert 0.15 <= first <= 0.2
    for _ in range(10):
        b.next_delay()
    assert 7.5 <= b.next_delay() <= 10.0
    b.reset()
    assert b.next_delay() <= 0.2
