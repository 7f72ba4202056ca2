"""The daemon's delivery side: claim → admit → render → send → decide → record.

A feeder claims due requests in the spool, asks the admission policies which may go now,
has those rendered (in the render processes) and hands them to the relay that is up (see
`relays`), whose workers (`connections` of them) each own one SMTP connection reused for many
messages. Every outcome, of a send or of a render, is recorded through `conclude`.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from functools import partial

from dispatcher.admission import Admission
from dispatcher.compose import RenderedMessage
from dispatcher.errors import StoreUnavailable
from dispatcher.journal import Journal
from dispatcher.observer import Observer
from dispatcher.outcome import LOG_LEVELS, Dead, Outcome, Retry, decide, describe, expired, finish
from dispatcher.relays import Relay, Relays
from dispatcher.renderpool import Failed, RenderPool
from dispatcher.settings import Settings
from dispatcher.spool import Finish, Row, Spool, Start, now
from dispatcher.storehealth import next_pause
from dispatcher.transport import Attempt, SmtpConnection

log = logging.getLogger(__name__)

# The feeder re-reads the spool at least this often, whatever it was told: also how soon it
# sees a request that another process (`dispatcher retry`) made due. A cheap indexed query.
IDLE_WAKE = 1.0
FEED_BATCH = 32  # at least this many rows per feed: one render round trip and one commit each
FIRST_RENDER = 2  # rows rendered ahead of the rest when the workers are idle (`hand_over`)
EXPIRE_BATCH = 1000  # rows looked at per idle turn for `retry.max_age` while nothing is sent
SHUTDOWN_GRACE = 10.0  # seconds in-flight sends may take to finish after SIGTERM


class Delivery:
    """The feeder, the workers, and the claims they hold."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        renders: RenderPool,
        observer: Observer,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.renders = renders
        self.observer = observer
        self.journal = Journal(spool, observer.store)
        # Rows claimed per feed: two per connection, so the next batch renders while the
        # workers send this one.
        self.batch = max(2 * settings.smtp.connections, FEED_BATCH)
        self.held: set[str] = set()  # claimed and not yet concluded or released
        self.expires_after = 0.0  # no request can run out of `retry.max_age` before this
        # Given back while the store could not take it: given back again on the next feed.
        self.unreleased: list[tuple[list[str], float | None]] = []
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()  # sends waiting for their rate's slot are not to go
        self.relays = Relays(settings, spool, observer, self.wake.set, self.batch)
        # The relays' health is one more policy: nothing is claimed while every one is down.
        self.admission = Admission([*admission.rules, self.relays])

    # -- the feeder --------------------------------------------------------------------

    async def feed(self) -> None:
        """Feed the workers; sleep until the next is due, a worker finishes or intake stores
        more."""
        await self.recover()
        pause = None
        while True:
            self.wake.clear()
            try:
                self.release_again()
                claimed, closed = await self.feed_once()
            except StoreUnavailable as exc:  # nothing was claimed: look again later
                self.observer.store.failed("claims", exc)
                pause = next_pause(pause)
                await asyncio.sleep(pause)
                continue
            self.observer.store.succeeded("claims")
            pause = None
            if not claimed:
                await self.idle(closed)

    async def recover(self) -> None:
        """Free what this daemon's earlier life held and beat its starting heartbeat: first, as
        nothing may be claimed before; waiting, while the store cannot be written, with intake
        already serving."""
        recovered = await self.observer.store.retry("leases", self.start_life)
        if recovered:
            log.warning("%d sends were interrupted by a crash; sending again", recovered)

    def start_life(self) -> int:
        """Free the earlier life's claims, then say this daemon started (`dispatcher status`)."""
        recovered = self.spool.recover(now())
        self.spool.heartbeat(now(), starting=True)
        return recovered

    async def feed_once(self) -> tuple[int, float | None]:
        """Claim, admit, render and hand over one batch; returns how many rows were claimed
        and, while a policy lets nothing go, until when."""
        at = now()
        closed = self.admission.closed_until(at)
        if closed is not None:
            self.expire_waiting(at)
            return 0, closed
        rows = self.spool.claim(at, self.batch)
        self.held.update(row.id for row in rows)
        go, later = self.admission.admit(self.unexpired(rows, at), at)
        for row, when in later:
            self.release([row.id], when)
        await self.hand_over(go)
        return len(rows), None

    def unexpired(self, rows: list[Row], at: float) -> list[Row]:
        """The rows still within `retry.max_age`; the others are dead, never sent so late (a
        password reset link days old is worse than none)."""
        live = []
        for row in rows:
            if expired(row, self.settings.retry, at):
                max_age = self.settings.retry.max_age
                self.conclude(row, Dead(f"gave up after {max_age:g} s in the queue, unsent"))
            else:
                live.append(row)
        return live

    def expire_waiting(self, at: float) -> None:
        """While nothing may be sent (every relay down), `retry.max_age` still holds: the
        requests it ran out for become dead now, not when a relay is back."""
        if at < self.expires_after:
            return
        oldest = self.spool.oldest_waiting()
        # Nothing waiting now expires before the oldest does, nor anything that comes later.
        self.expires_after = (oldest if oldest is not None else at) + self.settings.retry.max_age
        if at < self.expires_after:
            return
        rows = self.spool.claim(at, EXPIRE_BATCH)
        self.held.update(row.id for row in rows)
        self.release([row.id for row in self.unexpired(rows, at)])

    async def hand_over(self, rows: list[Row]) -> None:
        """Render, record the starts in one transaction, queue for the workers.

        With nothing else in flight (a burst begins) the first FIRST_RENDER rows go ahead on
        their own: a worker sends the first mail while the rest of the batch still renders.
        Cancelled (at shutdown), the rows not yet with a worker wait in the spool as before.
        """
        waiting = {row.id for row in rows}
        idle = len(self.held) <= len(rows)
        parts = (
            [rows[:FIRST_RENDER], rows[FIRST_RENDER:]] if idle and rows[FIRST_RENDER:] else [rows]
        )
        try:
            for part in parts:
                ready = await self.render(part)
                relay = self.relays.active()
                if relay is None:  # every relay went down while these rendered
                    return
                at = now()
                starts = [Start(row, row.attempts + 1, at) for row in ready]
                await self.observer.store.retry("claims", partial(self.journal.start, starts))
                for row in ready:
                    await relay.queue.put(row)
                    waiting.discard(row.id)
        finally:
            self.release(list(waiting & self.held))

    async def idle(self, closed: float | None) -> None:
        """Wait for the next due time (at most IDLE_WAKE), or an earlier wake-up.

        A due time already past belongs to a row a worker holds: a worker finishing wakes us,
        so waiting for that is not a busy loop.
        """
        next_due = closed
        if next_due is None:
            with contextlib.suppress(StoreUnavailable):  # a store that is down: look in a second
                next_due = self.spool.next_due_at()
        current = now()
        timeout = IDLE_WAKE
        if next_due is not None and next_due > current:
            timeout = min(IDLE_WAKE, next_due - current)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
        # arrives as the event is set, and the feeder then outlived shutdown by IDLE_WAKE.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wake.wait()

    async def render(self, rows: list[Row]) -> list[Row]:
        """The rows with their messages: rendered once (the bytes are kept with the first
        attempt). A template or request error makes the request dead."""
        fresh = [row for row in rows if row.message is None]
        results = await self.renders.render([row.request for row in fresh])
        rendered = dict(zip((row.id for row in fresh), results, strict=True))
        ready = []
        for row in rows:
            match rendered.get(row.id):
                case None:
                    ready.append(row)
                case RenderedMessage() as message:
                    ready.append(
                        dataclasses.replace(
                            row,
                            envelope_from=message.envelope_from,
                            recipients=list(message.recipients),
                            message=message.data,
                            message_id=message.message_id,
                        )
                    )
                case Failed(reason, permanent=True):
                    self.conclude(row, Dead(reason))
                case Failed(reason):  # a fault of ours, not of the request: try again later
                    self.conclude(row, Retry(reason, now() + self.settings.retry.backoff[0]))
        return ready

    def release(self, request_ids: Sequence[str], not_before: float | None = None) -> None:
        """Give claimed rows back to the spool unsent (later, if the store cannot take it now:
        till then they stay claimed by this daemon, and nobody sends them)."""
        if not request_ids:
            return
        self.held.difference_update(request_ids)
        self.admission.finished(request_ids)
        try:
            self.spool.release(request_ids, not_before)
        except StoreUnavailable as exc:
            self.observer.store.failed("claims", exc)
            self.unreleased.append((list(request_ids), not_before))

    def release_again(self) -> None:
        """Give back what could not be given back before; `StoreUnavailable` if still not."""
        while self.unreleased:
            request_ids, not_before = self.unreleased[0]
            self.spool.release(request_ids, not_before)
            del self.unreleased[0]

    # -- the workers -------------------------------------------------------------------

    async def work(self, relay: Relay) -> None:
        """One delivery worker of `relay` with its own SMTP connection, kept open between
        messages. Rows queued for a relay that has gone down go back unsent."""
        async with SmtpConnection(relay.settings) as connection:
            self.observer.watch(connection)
            while True:
                row = await relay.queue.get()
                try:
                    if relay.up:
                        await self.deliver(relay, connection, row)
                    else:
                        self.release([row.id])
                except Exception:  # a bug on one message must not stop delivery of the rest
                    log.exception("unexpected error delivering %s; will retry", row.id)
                    self.conclude(
                        row, Retry("internal error", now() + self.settings.retry.backoff[1])
                    )
                finally:
                    self.held.discard(row.id)
                    self.wake.set()

    async def deliver(self, relay: Relay, connection: SmtpConnection, row: Row) -> None:
        assert row.message is not None and row.recipients is not None and row.envelope_from
        try:
            if not await relay.pace.wait(self.stopping):
                self.release([row.id])  # stopping while it waited for the rate: never sent
                return
        except asyncio.CancelledError:
            self.release([row.id])
            raise
        try:
            started = time.monotonic()
            attempt = await connection.deliver(row.envelope_from, row.recipients, row.message)
            self.observer.attempted(time.monotonic() - started)
        except asyncio.CancelledError:
            # Shutdown cut the send short: the server may have the message, so it goes again
            # (same bytes, same Message-ID), flagged as a possible duplicate.
            at = now()
            self.journal.finish(
                Finish(row.id, "retry", at, "interrupted by shutdown", at, maybe_duplicate=True)
            )
            self.journal.flush()
            raise
        at = now()
        if not self.relays.judge(relay, attempt):  # the relay failed, not this message:
            if expired(row, self.settings.retry, at):  # no attempt used, but max_age holds
                reason = f"gave up after {self.settings.retry.max_age:g} s in the queue"
                self.conclude(row, Dead(f"{reason}: {attempt.reply}"), attempt)
            else:
                self.release([row.id])
            return
        self.conclude(row, decide(attempt, row, row.attempts + 1, self.settings.retry, at), attempt)

    def conclude(self, row: Row, outcome: Outcome, attempt: Attempt | None = None) -> None:
        """The one path of every outcome: recorded, counted, logged in one line."""
        at = now()
        self.journal.finish(finish(row, outcome, at, attempt))
        self.held.discard(row.id)
        self.admission.finished([row.id])
        self.observer.finished(outcome.state, row.created_at)
        level = LOG_LEVELS[outcome.state]
        if attempt is None:  # nothing was sent: a render failure, or a fault of ours
            log.log(
                level, "%s %s template=%s: %s", outcome.state, row.id, row.template, outcome.reply
            )
            return
        domain = (row.recipients or ["?"])[0].rpartition("@")[2]
        log.log(
            level,
            "%s %s template=%s domain=%s attempt=%d code=%s %s",
            outcome.state,
            row.id,
            row.template,
            domain,
            row.attempts + 1,
            attempt.code,
            describe(outcome, at),
        )
        if attempt.refused and outcome.state != "dead":
            log.error("refused %s: %s", row.id, attempt.refused)

    # -- claims and shutdown -----------------------------------------------------------

    async def keep_claims(self) -> None:
        """Renew this daemon's leases and beat its heartbeat; free what daemons whose leases
        lapsed left behind."""
        every = self.settings.spool.lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                freed = self.spool.renew(now())
                self.spool.heartbeat(now())  # `dispatcher status` shows this daemon alive
            except StoreUnavailable as exc:  # a lease that lapses meanwhile is taken over by
                self.observer.store.failed("leases", exc)  # another daemon, as after a crash
                continue
            self.observer.store.succeeded("leases")
            if freed:
                log.warning("%d sends of a daemon that stopped renewing go again", freed)
                self.wake.set()

    async def stop(self, workers: Sequence[asyncio.Task[None]]) -> None:
        """Let sends in flight finish (bounded), give the rest back to the spool."""
        self.stopping.set()
        unsent = []
        for relay in self.relays.all:  # handed over but not sent: they wait as before
            while not relay.queue.empty():
                unsent.append(relay.queue.get_nowait().id)
        self.release(unsent)
        if self.held:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    while self.held:
                        await self.wake.wait()
                        self.wake.clear()
        for worker in workers:
            worker.cancel()
        self.journal.flush()
        if self.journal.finishes or self.unreleased:
            log.error(
                "the store is unavailable: %d outcomes not recorded and %d claims not given"
                " back; those requests go again at the next start",
                len(self.journal.finishes),
                sum(len(ids) for ids, _ in self.unreleased),
            )
