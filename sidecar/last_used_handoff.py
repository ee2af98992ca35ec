"""Where a stopping sidecar leaves the `last_used_at` entries it could not write (SPEC 15):
a Redis hash that the next flush of any sidecar takes and writes.

Rules that hold here:
1. One key, with a hash tag, so that both scripts touch a single slot (Redis Cluster).
2. `put` keeps the later time per token id (two replicas stopping during one outage may
   leave the same id); times are fixed-width ISO strings, so they compare as strings.
3. `take` reads and deletes in one script: two sidecars never both take an entry, and an
   entry put while one takes is either taken or left for the next.
4. Only token row ids and times are stored, never a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sidecar.redisclient import GuardedRedis

HANDOFF_KEY = "sidecar:{last_used}:handoff"
# A sidecar that stopped during an outage may be the last one for a while: a week.
HANDOFF_TTL = 7 * 24 * 3600
_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"

_PUT = """
for i = 1, #ARGV - 1, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if (not current) or current < ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[#ARGV])
return 1
"""

_TAKE = """
local entries = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return entries
"""


class RedisLastUsedHandoff:
    def __init__(self, redis: GuardedRedis) -> None:
        self._put = redis.script("last_used_handoff", _PUT)
        self._take = redis.script("last_used_handoff", _TAKE)

    async def put(self, entries: Mapping[str, datetime]) -> bool:
        """Leave `entries` for another sidecar; False when Redis could not take them."""
        args: list[int | str] = []
        for token_id, at in entries.items():
            args += [token_id, at.strftime(_FORMAT)]
        return bool(await self._put([HANDOFF_KEY], [*args, HANDOFF_TTL]) == 1)

    async def take(self) -> dict[str, datetime]:
        """What stopped sidecars left (rule 3); empty when nothing, or Redis cannot say."""
        raw = await self._take([HANDOFF_KEY], [])
        if not isinstance(raw, list):
            return {}
        taken: dict[str, datetime] = {}
        for token_id, at in zip(raw[::2], raw[1::2], strict=False):
            try:
                key = token_id.decode() if isinstance(token_id, bytes) else str(token_id)
                text = at.decode() if isinstance(at, bytes) else str(at)
                taken[key] = datetime.strptime(text, _FORMAT)
            except (ValueError, UnicodeDecodeError):
                continue  # not ours: nothing to write
        return taken
