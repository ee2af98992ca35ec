"""Which lookups a read replica may answer (SPEC 3.5): none about a token that changed after
the point the replica has replayed up to.

The replica may lag. A token it does not know is re-checked on the primary anyway (see
sidecar.store rule 6), but a token deleted or disabled on the primary is still there on a
lagging replica: answering from it would bring a revoked token back. So:

Rules that hold here:
1. Every change heard by NOTIFY fences its token digest at once (synchronously, before any
   lookup can run): lookups of a fenced token go to the primary.
2. A fence is lifted only when the replica has replayed past a WAL position of the primary
   read *after* the change was heard (so at or after its commit): from then on the replica
   knows the change.
3. Whenever changes may have been missed (at start, after a LISTEN gap, a change of every
   row, or more fenced tokens than `max_tokens`), everything is fenced, the same way.
4. Any error keeps the fences up: when in doubt, the primary answers.
5. While LISTEN is not verified delivering (`listening`), no change is heard: the replica
   answers nothing, everything is fenced, and the position it must reach is read only once
   LISTEN hears again (a position read earlier would miss changes made in between).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from sidecar.backoff import Backoff
from sidecar.dependency_log import describe

log = logging.getLogger("sidecar.replica_fence")

Lsn = Callable[[], Awaitable[int]]

# WAL positions as byte numbers; the replica's: where replay has got to.
# The insert position, not pg_current_wal_lsn() (the write position): with asynchronous
# commit a committed transaction's commit record may not be written yet.
PRIMARY_LSN_SQL = "SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint"
REPLICA_LSN_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_insert_lsn() END - '0/0')::bigint"
)
POLL_INTERVAL = 0.1
MAX_RETRY = 2.0  # between attempts while a server does not answer
MAX_TOKENS = 100_000


class ReplicaFence:
    def __init__(self, primary_lsn: Lsn, replica_lsn: Lsn, *,
                 max_tokens: int = MAX_TOKENS, poll_interval: float = POLL_INTERVAL,
                 listening: Callable[[], bool] = lambda: True) -> None:
        self.listening = listening
        self._primary_lsn = primary_lsn
        self._replica_lsn = replica_lsn
        self.max_tokens = max_tokens
        self.poll_interval = poll_interval
        # digest -> the primary's position the replica must reach (>= 0), or, while that is
        # not read yet, minus the number of the change that set the fence (< 0).
        self._tokens: dict[str, int] = {}
        self._seq = 1
        self._all: int | None = -1  # rule 3: at start, nothing is known
        self._wake = asyncio.Event()

    def allows(self, digest: str) -> bool:
        """The replica may answer a lookup of this token."""
        if not self.listening():  # rule 5
            if self._all is None or self._all >= 0:
                self.everything()
            return False
        return self._all is None and digest not in self._tokens

    @property
    def fenced(self) -> bool:
        return self._all is not None or bool(self._tokens)

    def changed(self, digests: Iterable[str]) -> None:
        self._seq += 1
        for digest in digests:
            self._tokens[digest] = -self._seq
        if len(self._tokens) > self.max_tokens:
            self.everything()
        self._wake.set()

    def everything(self) -> None:
        self._tokens.clear()
        self._seq += 1
        self._all = -self._seq
        self._wake.set()

    async def run(self) -> None:
        """Lift fences as the replica catches up (rule 2); runs until cancelled."""
        backoff = Backoff(base=self.poll_interval, cap=MAX_RETRY)
        while True:
            if not self.fenced:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # rule 4; the store logs what failed
                log.debug("replica position not known: %s", describe(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            await asyncio.sleep(self.poll_interval)

    async def _step(self) -> None:
        if not self.listening():
            return  # rule 5: a position read now could precede changes nobody heard
        upto = self._seq
        if (self._all is not None and self._all < 0) or any(
                at < 0 for at in self._tokens.values()):
            # Read after the changes up to `upto` were heard: at or past their commits
            # (rule 2). Fences set while it is being read wait for the next step.
            barrier = await self._primary_lsn()
            if self._all is not None and -upto <= self._all < 0:
                self._all = barrier
            for digest, at in self._tokens.items():
                if -upto <= at < 0:
                    self._tokens[digest] = barrier
        replayed = await self._replica_lsn()
        if self._all is not None and 0 <= self._all <= replayed:
            self._all = None
        done = [d for d, at in self._tokens.items() if 0 <= at <= replayed]
        for digest in done:
            del self._tokens[digest]
