"""Memory and false-positive rate of the unknown-token filter for 1 million tokens.

    .venv/bin/python benchmarks/bench_token_filter.py [tokens]

Builds the filter as `sidecar serve` sizes it (capacity = 2x the token count), adds that many
random digests, then probes as many digests that were never added.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import time

from sidecar.token_filter import BloomFilter, capacity_for


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bloom = BloomFilter(capacity_for(tokens))
    started = time.perf_counter()
    for _ in range(tokens):
        bloom.add(hashlib.sha256(os.urandom(16)).hexdigest())
    built = time.perf_counter() - started
    probes = min(tokens, 200_000)
    hits = sum(hashlib.sha256(os.urandom(16)).hexdigest() in bloom for _ in range(probes))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"tokens:               {tokens}")
    print(f"capacity:             {bloom.capacity} ({bloom.probes} probes)")
    print(f"bit array:            {bloom.nbytes / 2**20:.2f} MiB")
    print(f"max RSS growth:       {(rss_after - rss_before) / 1024:.2f} MiB")
    print(f"build (pure Python):  {built:.1f} s")
    print(f"false positives:      {hits}/{probes} = {hits / probes:.4%}")


if __name__ == "__main__":
    main()
