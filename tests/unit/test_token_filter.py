"""The Bloom filter behind the unknown-token filter: no false negatives, and a false-positive
rate within its 0.1 % design at capacity."""

from __future__ import annotations

import hashlib

from sidecar.token_filter import BloomFilter, TokenFilter, capacity_for


def _digest(i: int, salt: str = "in") -> str:
    return hashlib.sha256(f"{salt}-{i}".encode()).hexdigest()


def test_no_false_negatives_and_rate_at_capacity() -> None:
    bloom = BloomFilter(20_000)
    for i in range(20_000):
        bloom.add(_digest(i))
    assert all(_digest(i) in bloom for i in range(20_000))
    false = sum(_digest(i, "out") in bloom for i in range(50_000))
    assert false / 50_000 < 0.002  # designed for 0.1 %; margin for sampling noise


def test_sized_with_headroom() -> None:
    assert capacity_for(10) == 100_000
    assert capacity_for(1_000_000) == 2_000_000


def test_unbuilt_or_not_listening_admits_everything_and_budget_asks() -> None:
    listening = [True]
    f = TokenFilter("SELECT 1", miss_budget=2, listening=lambda: listening[0])
    assert f.admits(_digest(1))  # not built yet
    f._bloom = BloomFilter(1000)
    f.note(_digest(2))
    assert f.admits(_digest(2))
    assert [f.admits(_digest(3)) for _ in range(5)].count(True) <= 3  # the budget
    listening[0] = False
    assert f.admits(_digest(3))
    f.note_payloads([f'[{{"h": "{_digest(4)}", "s": "app"}}]', "not json"])
    listening[0] = True
    assert _digest(4) in f._bloom
    f.forget()
    assert f.admits(_digest(5))
