"""Whether the daemon can write to its store, and how it waits while it cannot.

Any store raises `StoreUnavailable` for a write that may succeed later (a full disk, a database
that is down). The daemon's writers (intake, delivery, the claims' renewal) then wait here and
try again, instead of dying: the store is unavailable while any of them fails, which is said in
one log line when it starts and one when it ends.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from dispatcher.errors import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_PAUSE = (0.05, 5.0)  # first and longest pause between two tries of a write, seconds


def next_pause(pause: float | None) -> float:
    """The pause before the next try of a write that failed after `pause` (None: the first)."""
    return RETRY_PAUSE[0] if pause is None else min(2 * pause, RETRY_PAUSE[1])


class StoreHealth:
    """Which writers fail now, since when, and why."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.since: float | None = None  # time.monotonic() when the first writer failed
        self.reason = ""
        self.back = asyncio.Event()  # set while no writer fails: the others try again at once
        self.back.set()

    @property
    def available(self) -> bool:
        return not self.failing

    def failed(self, writer: str, exc: StoreUnavailable) -> None:
        """`writer` could not write; the first failure of an outage is logged."""
        if not self.failing:
            self.since, self.reason = time.monotonic(), str(exc)
            self.back.clear()
            log.error(
                "store unavailable: %s; new requests are not acknowledged (clients keep them)"
                " and every write is tried again until it succeeds",
                exc,
            )
        self.failing.add(writer)

    def succeeded(self, writer: str) -> None:
        """`writer` wrote; the last writer to recover ends the outage."""
        if writer not in self.failing:
            return
        self.failing.discard(writer)
        if not self.failing:
            log.warning("store available again after %.1f s", self.unavailable_for())
            self.since = None
            self.back.set()

    def unavailable_for(self) -> float:
        """Seconds since the store became unavailable; 0 while it is available."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    async def retry(
        self, writer: str, write: Callable[[], T], waiting: Callable[[], None] | None = None
    ) -> T:
        """Call `write` until it succeeds, pausing between tries (bounded, doubling);
        `waiting` is called after each failure."""
        pause = None
        while True:
            try:
                result = write()
            except StoreUnavailable as exc:
                self.failed(writer, exc)
                if waiting is not None:
                    waiting()
                pause = next_pause(pause)
                with contextlib.suppress(TimeoutError):  # or sooner, once another writer wrote
                    async with asyncio.timeout(pause):
                        await self.back.wait()
                continue
            self.succeeded(writer)
            return result
