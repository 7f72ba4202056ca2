"""Group commit of delivery bookkeeping: one spool transaction per turn of the event loop.

Every attempt writes twice: its start before the first byte goes to the server (so a crash
mid-send is known and the message goes again with the same bytes) and its outcome. With one
transaction each, 128 connections cost 256 commits per round of sends. Here all the starts and
outcomes of the workers that ran in one turn of the loop share a transaction: a worker awaits
its start's commit before sending; an outcome is committed on the next turn without waiting
(lost in a crash, it leaves the request `sending`, which the next start re-sends as a possible
duplicate: the same as a crash mid-send).
"""

import asyncio
import logging

from dispatcher.spool import Finish, Spool, Start

log = logging.getLogger(__name__)


class Journal:
    """Collects starts and finishes; commits them together on the next turn of the loop."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.starts: list[Start] = []
        self.finishes: list[Finish] = []
        self.committed: asyncio.Future[None] | None = None  # the commit being waited for

    async def start(self, start: Start) -> None:
        """Record an attempt's start; returns once it is committed (raises if that failed)."""
        self.starts.append(start)
        await asyncio.shield(self._commit_soon())

    def finish(self, finish: Finish) -> None:
        """Record an outcome; committed on the next turn of the loop."""
        self.finishes.append(finish)
        self._commit_soon()

    def flush(self) -> None:
        """Commit what is pending now: at shutdown, before the spool closes."""
        if self.committed is not None:
            self._commit()

    def _commit_soon(self) -> asyncio.Future[None]:
        if self.committed is None:
            loop = asyncio.get_running_loop()
            self.committed = loop.create_future()
            loop.call_soon(self._commit)
        return self.committed

    def _commit(self) -> None:
        committed, self.committed = self.committed, None
        starts, self.starts = self.starts, []
        finishes, self.finishes = self.finishes, []
        if committed is None:
            return
        try:
            self.spool.record(starts, finishes)
        except Exception as exc:  # disk full, say: the waiting workers see it; log the rest
            log.error("cannot record %d delivery outcomes in the spool: %s", len(finishes), exc)
            if starts:
                committed.set_exception(exc)
            else:
                committed.cancel()  # nobody waits for it: no "exception never retrieved"
            return
        committed.set_result(None)
