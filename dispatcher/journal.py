"""Group commit of delivery bookkeeping: few spool transactions for many messages.

Starts are committed, a batch at once, before the first byte goes to the server; outcomes are
committed together every FINISH_DELAY seconds (or FINISH_BATCH outcomes). An outcome the store
cannot take now (`StoreUnavailable`) waits in memory and is committed once it can; its request
stays `sending`, which this daemon never claims again. An outcome lost in a crash leaves its
request `sending`, which goes again at the next start as a possible duplicate.
"""

import asyncio
import logging
from collections.abc import Sequence

from dispatcher.errors import StoreUnavailable
from dispatcher.spool import Finish, Spool, Start
from dispatcher.storehealth import StoreHealth, next_pause

log = logging.getLogger(__name__)

FINISH_DELAY = 0.01  # seconds an outcome may wait for the transaction it shares
FINISH_BATCH = 256  # outcomes that make the transaction happen at once


class Journal:
    """Starts committed before they return; outcomes committed soon after, together."""

    def __init__(self, spool: Spool, health: StoreHealth) -> None:
        self.spool = spool
        self.health = health
        self.finishes: list[Finish] = []
        self.timer: asyncio.TimerHandle | None = None
        self.pause: float | None = None  # while the store is unavailable: until the next try

    def start(self, starts: Sequence[Start]) -> None:
        """Record attempts' starts, with the outcomes waiting so far, in one transaction;
        `StoreUnavailable` if the store cannot take them (then nothing was recorded)."""
        self._commit(starts)

    def finish(self, finish: Finish) -> None:
        """Record an outcome; committed within FINISH_DELAY seconds, or once the store is back."""
        self.finishes.append(finish)
        if len(self.finishes) >= FINISH_BATCH and self.pause is None:
            self._commit(())
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FINISH_DELAY, self.flush)

    def flush(self) -> None:
        """Commit the outcomes waiting now: on the timer, and at shutdown."""
        self._commit(())

    def _commit(self, starts: Sequence[Start]) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        finishes, self.finishes = self.finishes, []
        if not (starts or finishes):
            return
        try:
            self.spool.record(starts, finishes)
        except StoreUnavailable as exc:
            self.finishes[:0] = finishes  # first in line for the next try
            self.health.failed("outcomes", exc)
            self.pause = next_pause(self.pause)
            self.timer = asyncio.get_running_loop().call_later(self.pause, self.flush)
            if starts:
                raise
            return
        except Exception as exc:  # a fault of ours: those requests stay `sending` and go again
            log.error("cannot record %d delivery outcomes in the spool: %s", len(finishes), exc)
            if starts:
                raise
            return
        self.pause = None
        self.health.succeeded("outcomes")
