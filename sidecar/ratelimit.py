"""Rate limits per token and per tenant (SPEC 9): GCRA, shared through Redis.

Rules that hold here:
1. One atomic Redis script per request checks every limit that applies (token, tenant) and
   records the request only if all of them allow it; Redis's own clock is the time, so
   replicas with skewed clocks still share one limit.
2. While Redis is absent or unreachable, limits are kept per process (fail open, the
   default), or the request cannot be decided and gets 503 (SIDECAR_RATE_LIMIT_FAIL_OPEN=false).
3. Keys name the token's row id and the tenant id, never a token. The keys of one request
   share a hash tag (the tenant id, else the token id), so the script touches one slot of a
   Redis Cluster.
4. GCRA with a burst of the whole limit: `100/s` admits 100 requests at once, then one every
   10 ms. State is one timestamp per key (the theoretical arrival time, TAT).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.errors import AuthUnavailable, RateLimited
from sidecar.metrics import Metrics
from sidecar.models import Identity
from sidecar.rate import Rate
from sidecar.redisclient import GuardedRedis

RATE_PREFIX = "sidecar:rl:"
_LOCAL_KEYS = 100_000  # bound on per-process state; idle keys are dropped first

# KEYS: one per limit. ARGV: per key, emission interval and burst tolerance (microseconds).
# Returns {allowed, then per key: microseconds until the key's TAT, until allowed again}.
_GCRA = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {1}
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  tats[i] = tat
  local wait = tat - tolerance - now
  if wait > 0 then out[1] = 0 end
  out[#out + 1] = tat - now
  out[#out + 1] = math.max(wait, 0)
end
if out[1] == 1 then
  for i, key in ipairs(KEYS) do
    local new_tat = tats[i] + tonumber(ARGV[2 * i - 1])
    redis.call('SET', key, new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
    out[2 * i] = new_tat - now
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The state of the tightest limit after one request: what the RateLimit-* headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the limit is whole again
    retry_after: float  # seconds until a request would be allowed (0 when allowed)

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


def _verdict(rates: list[Rate], allowed: bool, until_tat: list[float],
             waits: list[float]) -> Verdict:
    """Combine per-limit states: the limit with the fewest remaining requests speaks."""
    best: Verdict | None = None
    for rate, tat, wait in zip(rates, until_tat, waits, strict=True):
        used = max(0.0, tat) / rate.interval
        remaining = max(0, min(rate.limit, math.floor(rate.limit - used + 1e-9)))
        v = Verdict(allowed, rate.limit, remaining, max(0.0, tat), wait)
        if best is None or v.remaining < best.remaining or (
                v.remaining == best.remaining and v.retry_after > best.retry_after):
            best = v
    assert best is not None
    return best


class LocalLimiter:
    """The same GCRA per process, for when Redis is absent or unreachable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tats: OrderedDict[str, float] = OrderedDict()

    def check(self, keys: list[str], rates: list[Rate]) -> Verdict:
        now = self.clock()
        tats = [max(self._tats.get(k, now), now) for k in keys]
        waits = [max(0.0, tat - rate.tolerance - now) for tat, rate in zip(tats, rates,
                                                                           strict=True)]
        # Float sums of intervals drift by ~1e-16: a nanosecond of slack keeps a burst whole.
        allowed = all(w <= 1e-9 for w in waits)
        if allowed:
            tats = [tat + rate.interval for tat, rate in zip(tats, rates, strict=True)]
            for key, tat in zip(keys, tats, strict=True):
                self._tats[key] = tat
                self._tats.move_to_end(key)
            while len(self._tats) > _LOCAL_KEYS:
                self._tats.popitem(last=False)
        return _verdict(rates, allowed, [t - now for t in tats], waits)


class RateLimiter:
    def __init__(
        self,
        *,
        per_token: Rate | None,
        per_tenant: Rate | None,
        redis: GuardedRedis | None,
        fail_open: bool,
        metrics: Metrics,
        local: LocalLimiter | None = None,
    ) -> None:
        self.per_token = per_token
        self.per_tenant = per_tenant
        self.redis = redis
        self._gcra = redis.script("ratelimit", _GCRA) if redis is not None else None
        self.fail_open = fail_open
        self.metrics = metrics
        self.local = local or LocalLimiter()

    @property
    def enabled(self) -> bool:
        return self.per_token is not None or self.per_tenant is not None

    def _limits(self, identity: Identity) -> tuple[list[str], list[Rate]]:
        keys: list[str] = []
        rates: list[Rate] = []
        tag = (f"{{ten:{identity.tenant_id}}}" if identity.tenant_id
               else f"{{tok:{identity.token_id}}}")
        if self.per_token is not None:
            keys.append(f"{RATE_PREFIX}{tag}:tok:{identity.token_id}")
            rates.append(self.per_token)
        if self.per_tenant is not None and identity.tenant_id:
            keys.append(f"{RATE_PREFIX}{tag}:ten")
            rates.append(self.per_tenant)
        return keys, rates

    async def check(self, identity: Identity) -> Verdict | None:
        """The verdict for one allowed request, or None when no limit applies.

        Raises RateLimited when over a limit, AuthUnavailable when the shared state cannot be
        asked and the configuration says not to guess (rule 2)."""
        keys, rates = self._limits(identity)
        if not keys:
            return None
        verdict = await self._shared(keys, rates) if self._gcra is not None else None
        if verdict is None:
            if self.redis is not None and not self.fail_open:
                raise AuthUnavailable("Rate limits cannot be checked right now")
            verdict = self.local.check(keys, rates)
        if not verdict.allowed:
            raise RateLimited(verdict.headers())
        return verdict

    async def _shared(self, keys: list[str], rates: list[Rate]) -> Verdict | None:
        assert self._gcra is not None
        args: list[int | str] = []
        for rate in rates:
            args += [round(rate.interval * 1e6), round(rate.tolerance * 1e6)]
        result = await self._gcra(keys, args)
        if not isinstance(result, list) or len(result) != 1 + 2 * len(keys):
            return None
        allowed = int(result[0]) == 1
        until_tat = [int(x) / 1e6 for x in result[1::2]]
        waits = [int(x) / 1e6 for x in result[2::2]]
        return _verdict(rates, allowed, until_tat, waits)
