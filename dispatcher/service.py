"""The daemon: intake from ZeroMQ into the spool, and delivery workers from the spool to SMTP.

One asyncio process. Intake waits for the socket to become readable, then drains it without
awaiting per message and commits the batch in one transaction; only then are receipts for the
batch published, so a receipt always means "in the spool". The overflow folder is read into the
spool the same way. A feeder hands due requests to `smtp.connections` workers, each owning one
SMTP connection reused for many messages.
"""

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import orjson
import zmq
import zmq.asyncio

from dispatcher import curve, overflow, wire
from dispatcher.backoff import retry_delay
from dispatcher.errors import DispatcherError, InvalidRequest, StartupError
from dispatcher.journal import Journal
from dispatcher.observer import Observer
from dispatcher.render import RenderedMessage
from dispatcher.renderpool import Failed, RenderPool
from dispatcher.settings import Settings
from dispatcher.spool import Finish, Incoming, Row, Spool, Start, now
from dispatcher.transport import Attempt, SmtpConnection

log = logging.getLogger(__name__)

RECEIVE_HWM = 50_000
BATCH = 1000  # frames per intake transaction: ~200k rows/s with synchronous=FULL
# The feeder re-reads the spool at least this often, whatever it was told: also how soon it
# sees a request that another process (`dispatcher retry`) made due. A cheap indexed query.
IDLE_WAKE = 1.0
FEED_BATCH = 32  # at least this many rows per feed: one render round trip and one commit each
SHUTDOWN_GRACE = 10.0  # seconds in-flight sends may take to finish after SIGTERM
RECEIPT_HWM = 100_000  # receipts queued per subscriber before PUB drops (a drop = a re-send)
OVERFLOW_SCAN = 1.0  # seconds between looks at the overflow folder
PRUNE_EVERY = 600.0  # seconds between retention passes over sent requests
PRUNE_SLICE = 5000  # rows deleted per transaction, so the loop is never held for long


@dataclass(frozen=True, slots=True)
class Sent:
    """Every recipient that can be reached has the message."""

    reply: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Some recipients were deferred; try them again at `at`."""

    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Dead:
    """The request will never be delivered (further); `reason` says why."""

    reason: str


Outcome = Sent | Retry | Dead


def decide(attempt: Attempt, row: Row, number: int, settings: Settings, at: float) -> Outcome:
    """The one place where an attempt's result becomes the request's fate."""
    delivered = bool(attempt.delivered or row.delivered)
    if not attempt.deferred:
        if delivered:
            return Sent(attempt.reply)
        return Dead(attempt.reply)
    retry = settings.retry
    expires = row.created_at + retry.max_age
    if number >= retry.attempts:
        return Dead(f"gave up after {number} attempts: {attempt.reply}")
    if at >= expires:
        return Dead(f"gave up after {retry.max_age:g} s in the queue: {attempt.reply}")
    delay = retry_delay(number, *retry.backoff)
    return Retry(attempt.reply, min(at + delay, expires))


class Daemon:
    """The running service: sockets, spool, renderer and the tasks that connect them."""

    def __init__(self, settings: Settings, *, auto_reload: bool = False) -> None:
        """`auto_reload`: templates edited while it runs are used for the next render
        (`dispatcher dev`); a production daemon compiles each template once."""
        self.settings = settings
        if not settings.templates.dir.is_dir():
            raise StartupError(f"templates.dir: {settings.templates.dir} is not a folder")
        self.renders = RenderPool(
            settings.templates.dir,
            settings.mail.from_,
            settings.templates.render_processes,
            auto_reload=auto_reload,
        )
        self.renderer = self.renders.renderer  # intake's "is there such a template?"
        for key in ("bind", "acks"):
            curve.check_bind_allowed(
                f"intake.{key}", getattr(settings.intake, key), settings.intake.curve
            )
        self.spool = Spool(settings.spool.path)
        self.journal = Journal(self.spool)
        self.observer = Observer(settings, self.spool)
        self.context = zmq.asyncio.Context()
        self.counts: Counter[str] = Counter()
        self.gate: curve.Gatekeeper | None = None
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the protocol limit still arrive, to be rejected with their size;
        # anything larger makes libzmq drop the sender's connection instead of allocating it.
        self.pull.setsockopt(zmq.MAXMSGSIZE, 2 * wire.MAX_FRAME_BYTES)
        # A deep receive queue absorbs bursts (the spool drains ~100k frames/s) instead of
        # pushing back on clients, whose sends would then fail with "no daemon reachable".
        self.pull.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.receipts = self.context.socket(zmq.PUB)
        self.receipts.setsockopt(zmq.LINGER, 200)
        self.receipts.setsockopt(zmq.SNDHWM, RECEIPT_HWM)
        try:
            self.bind_sockets()
        except DispatcherError:  # an address in use, or a key or allowlist that cannot be read
            self.close()
            raise
        self.drain_socket: zmq.Socket[bytes] = zmq.Socket.shadow(self.pull.underlying)
        # Rows handed over per feed: two per connection, so the next batch renders while the
        # workers send this one.
        self.batch = max(2 * settings.smtp.connections, FEED_BATCH)
        self.queue: asyncio.Queue[Row] = asyncio.Queue(maxsize=self.batch)
        self.in_hand: set[str] = set()
        self.wake = asyncio.Event()
        self.overflow_complaint = ""

    def bind_sockets(self) -> None:
        """Intake and receipts, each secured by CURVE when `intake.curve` is set."""
        intake = self.settings.intake
        for socket in (self.pull, self.receipts):  # receipts follow the intake's rules
            curve.secure_server_socket(socket, intake)
        self.gate = curve.start_authenticator(self.context, intake, self.counts)
        for key, socket, endpoint in (
            ("intake.bind", self.pull, intake.bind),
            ("intake.acks", self.receipts, intake.acks),
        ):
            if self.gate is not None:
                self.gate.watch(socket, key)
            try:
                socket.bind(endpoint)
            except zmq.ZMQError as exc:
                raise StartupError(f"{key}: cannot bind {endpoint}: {exc}") from None

    def close(self) -> None:
        self.renders.close()
        self.observer.close()
        if self.gate is not None:
            self.gate.stop()
        self.pull.close(linger=0)
        self.receipts.close()
        self.context.term()
        self.spool.close()

    # -- intake ------------------------------------------------------------------------

    async def intake(self) -> None:
        """Wait for readiness, then drain and store in batches (~6x faster than awaiting each)."""
        while True:
            await self.pull.poll()  # readable (POLLIN), no timeout
            self.store_pending()

    def store_pending(self) -> int:
        """Drain up to BATCH frames without blocking and commit them in one transaction."""
        frames = []
        for _ in range(BATCH):
            try:
                frames.append(self.drain_socket.recv(zmq.NOBLOCK, copy=True))
            except zmq.Again:
                break
        if frames:
            self.store(frames)
        return len(frames)

    def store(self, frames: list[bytes]) -> None:
        """Commit a batch, then acknowledge every frame in it that names its client."""
        accepted, rejected = [], []
        receipts: defaultdict[str, list[str]] = defaultdict(list)
        for frame in frames:
            try:
                incoming = self.accept(frame)
            except InvalidRequest as exc:
                rejected.append((str(exc), frame))
                log.warning("rejected: %s (frame of %d bytes)", exc, len(frame))
                sender = wire.sender_of(frame)
                if sender:  # recorded as rejected: the client must not send it forever
                    receipts[sender[0]].append(sender[1])
                continue
            accepted.append(incoming)
            if incoming.client:
                receipts[incoming.client].append(incoming.id)
        added = set(self.spool.add(accepted, rejected, now()))
        self.acknowledge(receipts)
        self.log_received(accepted, added)
        self.counts.update(received=len(added), rejected=len(rejected))
        self.observer.count(received=len(added), rejected=len(rejected))
        if added:
            self.wake.set()

    def log_received(self, accepted: list[Incoming], added: set[str]) -> None:
        """One INFO line per batch, one DEBUG line per request: at 50,000 requests a second a
        line each would cost a third of the intake's CPU and overrun journald's rate limit."""
        debug = log.isEnabledFor(logging.DEBUG)
        for request in accepted:
            if request.id not in added:
                log.info("duplicate %s ignored: the spool already holds it", request.id)
            elif debug:
                to = orjson.loads(request.request)["to"]
                domain = (to if isinstance(to, str) else to[0]).rpartition("@")[2].rstrip(">")
                log.debug("received %s template=%s domain=%s", request.id, request.template, domain)
        if added:
            log.info("received %d requests", len(added))

    def acknowledge(self, receipts: dict[str, list[str]]) -> None:
        """Publish `"<client> <id> <id> ..."` per client; never blocks (PUB drops instead)."""
        for client, ids in receipts.items():
            for start in range(0, len(ids), BATCH):
                frame = " ".join([client, *ids[start : start + BATCH]]).encode()
                with contextlib.suppress(zmq.Again):
                    self.receipts.send(frame, zmq.NOBLOCK)

    async def ingest_overflow(self) -> None:
        """Read spill files into the spool, at start and then every OVERFLOW_SCAN seconds."""
        while True:
            for path in self.overflow_files():
                await self.ingest(path)
            await asyncio.sleep(OVERFLOW_SCAN)

    def overflow_files(self) -> list[Path]:
        folder = self.settings.client.overflow_dir
        try:
            return overflow.waiting(folder)
        except OSError as exc:  # e.g. a folder the daemon's user may not read
            if str(exc) != self.overflow_complaint:  # said once, not every scan
                self.overflow_complaint = str(exc)
                log.error("cannot read client.overflow_dir %s: %s", folder, exc)
            return []

    async def ingest(self, path: Path) -> None:
        """Commit one spill file's requests, then delete it (never before the commit)."""
        try:
            frames = overflow.read(path)
            if frames is None:
                return  # another daemon or a client took it first
            for start in range(0, len(frames), BATCH):
                self.store(frames[start : start + BATCH])
                await asyncio.sleep(0)  # a large file must not hold up the loop
            overflow.remove(path)
        except OSError as exc:
            log.error("cannot ingest overflow file %s: %s", path, exc)
            return
        log.info("ingested %d requests from overflow file %s", len(frames), path.name)

    async def prune(self) -> None:
        """Delete sent requests older than `spool.keep_sent`, a slice at a time."""
        keep = self.settings.spool.keep_sent
        while True:
            removed = 0
            while (n := self.spool.purge("sent", keep, now(), limit=PRUNE_SLICE)) > 0:
                removed += n
                await asyncio.sleep(0)
            if removed:
                log.info("pruned %d sent requests older than %g s", removed, keep)
            await asyncio.sleep(PRUNE_EVERY)

    def accept(self, frame: bytes) -> Incoming:
        """Check a frame (`wire.check`: a few µs; the full validation runs when it is rendered,
        in a render worker) and make it a row for the spool."""
        fields = wire.parse(frame)
        wire.check(fields, len(frame))
        if not self.renderer.has_template(fields["template"]):
            raise InvalidRequest(f"template: unknown template {fields['template']!r}")
        if fields.get("id") is None:  # a foreign sender may leave naming it to us
            fields["id"] = wire.new_id()
            frame = orjson.dumps(fields)
        return Incoming.from_fields(fields, frame)

    # -- delivery ----------------------------------------------------------------------

    async def feed(self) -> None:
        """Hand due requests to the workers, rendered; sleep until the next is due or intake
        wakes us. A batch renders (in the render processes) while the workers send the last."""
        while True:
            self.wake.clear()
            rows = self.spool.due(now(), self.batch, self.in_hand)
            self.in_hand.update(row.id for row in rows)
            waiting = {row.id for row in rows}  # in hand, not yet with a worker
            started: dict[str, Start] = {}
            try:
                ready = await self.prepare(rows)
                at = now()
                started = {row.id: Start(row, row.attempts + 1, at) for row in ready}
                self.journal.start(list(started.values()))  # one transaction for the batch
                for row in ready:
                    await self.queue.put(row)
                    waiting.discard(row.id)
                    del started[row.id]
            except BaseException:  # cancelled at shutdown: these wait in the spool as before
                self.in_hand.difference_update(waiting)
                self.spool.release(list(started.values()))
                raise
            if rows:
                continue
            # Nothing due outside the workers' hands. A due time already past belongs to a row
            # they hold: a worker finishing wakes us, so waiting for that is not a busy loop.
            next_due, current = self.spool.next_due_at(), now()
            timeout = IDLE_WAKE
            if next_due is not None and next_due > current:
                timeout = min(IDLE_WAKE, next_due - current)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
            # arrives as the event is set, and the feeder then outlived shutdown by IDLE_WAKE.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wake.wait()

    async def work(self) -> None:
        """One delivery worker with its own SMTP connection, kept open between messages."""
        async with SmtpConnection(self.settings.smtp) as connection:
            self.observer.watch(connection)
            while True:
                row = await self.queue.get()
                try:
                    await self.deliver(connection, row)
                except Exception:  # a bug on one message must not stop delivery of the rest
                    log.exception("unexpected error delivering %s; will retry", row.id)
                    self.retry_later(row, "internal error", self.settings.retry.backoff[1])
                finally:
                    self.in_hand.discard(row.id)
                    self.wake.set()

    async def deliver(self, connection: SmtpConnection, row: Row) -> None:
        assert row.message is not None and row.recipients is not None and row.envelope_from
        number = row.attempts + 1  # its start was committed by the feeder
        try:
            started = time.monotonic()
            attempt = await connection.deliver(row.envelope_from, row.recipients, row.message)
            self.observer.attempted(time.monotonic() - started)
        except asyncio.CancelledError:
            # Shutdown cut the send short: the server may have the message, so it goes again
            # (same bytes, same Message-ID) and is flagged as a possible duplicate.
            self.journal.flush()
            self.spool.requeue_interrupted(now(), row.id)
            raise
        self.record(row, number, attempt)

    async def prepare(self, rows: list[Row]) -> list[Row]:
        """The rows with their messages: rendered once (the bytes are kept with the first
        attempt). A template or request error makes the request dead."""
        fresh = [row for row in rows if row.message is None]
        results = dict(zip((row.id for row in fresh), await self.renders.render(
            [row.request for row in fresh]
        ), strict=True))  # fmt: skip
        ready = []
        for row in rows:
            match results.get(row.id):
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
                    self.journal.finish(Finish(row.id, "dead", now(), reason))
                    self.in_hand.discard(row.id)
                    self.counts["dead"] += 1
                    self.observer.count(dead=1)
                    log.error("dead %s template=%s: %s", row.id, row.template, reason)
                case Failed(reason):
                    log.error("cannot render %s now: %s; will retry", row.id, reason)
                    self.retry_later(row, reason, self.settings.retry.backoff[0])
        return ready

    def retry_later(self, row: Row, reason: str, delay: float) -> None:
        """Put a request back for a fault of ours, not of the request or the server."""
        at = now()
        self.journal.finish(Finish(row.id, "retry", at, reason, next_attempt_at=at + delay))
        self.in_hand.discard(row.id)

    def record(self, row: Row, number: int, attempt: Attempt) -> None:
        """Store the attempt and the request's new state, and log it in one line."""
        at = now()
        outcome = decide(attempt, row, number, self.settings, at)
        retry_at: float | None = None
        match outcome:
            case Sent(reply):
                state, level, reply, detail = "sent", logging.INFO, reply, f"reply={reply!r}"
            case Retry(reason, when):
                retry_at = when
                state, level, reply, detail = (
                    "retry",
                    logging.WARNING,
                    reason,
                    f"in {when - at:.1f}s: {reason}",
                )
            case Dead(reason):
                state, level, reply, detail = "dead", logging.ERROR, reason, f"reason={reason!r}"
        self.journal.finish(
            Finish(
                row.id,
                state,
                at,
                reply,
                next_attempt_at=retry_at,
                code=attempt.code,
                number=number,
                recipients=list(attempt.deferred),
                delivered=[*row.delivered, *attempt.delivered],
                refused={**row.refused, **attempt.refused},
            )
        )
        domain = (row.recipients or ["?"])[0].rpartition("@")[2]
        log.log(
            level,
            "%s %s template=%s domain=%s attempt=%d code=%s %s",
            state,
            row.id,
            row.template,
            domain,
            number,
            attempt.code,
            detail,
        )
        self.counts[state] += 1
        self.observer.finished(state, row.created_at)
        if attempt.refused and state != "dead":
            log.error("refused %s: %s", row.id, attempt.refused)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down within SHUTDOWN_GRACE seconds."""
        recovered = self.spool.requeue_interrupted(now())
        if recovered:
            log.warning("%d sends were interrupted by a crash; sending again", recovered)
        self.renders.start()
        self.observer.start()  # metrics endpoint, then READY=1: every socket is bound
        log.info(
            "listening on %s (receipts on %s), delivering to %s:%d with %d connections",
            self.settings.intake.bind,
            self.settings.intake.acks,
            self.settings.smtp.host,
            self.settings.smtp.port,
            self.settings.smtp.connections,
        )
        async with asyncio.TaskGroup() as group:
            watchdog = group.create_task(self.observer.keep_alive(), name="watchdog")
            intake = group.create_task(self.intake(), name="intake")
            feeder = group.create_task(self.feed(), name="feeder")
            chores = [
                group.create_task(self.ingest_overflow(), name="overflow"),
                group.create_task(self.prune(), name="prune"),
            ]
            workers = [
                group.create_task(self.work(), name=f"worker-{i}")
                for i in range(self.settings.smtp.connections)
            ]
            await stop.wait()
            log.info("stopping: no new requests; finishing sends in flight")
            self.observer.stopping()
            intake.cancel()
            for chore in chores:
                chore.cancel()
            # What already arrived is persisted, not dropped: at most RECEIVE_HWM frames.
            for _ in range(RECEIVE_HWM // BATCH + 1):
                if self.store_pending() < BATCH:
                    break
            feeder.cancel()
            await self.stop_workers(workers)
            self.journal.flush()
            watchdog.cancel()
        log.info(
            "stopped: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "idle"
        )

    async def stop_workers(self, workers: list[asyncio.Task[None]]) -> None:
        """Let sends in flight finish (bounded), abandon the rest safely."""
        busy = len(self.in_hand) - self.queue.qsize()
        unsent = []
        while not self.queue.empty():  # handed over but not sent: they wait in the spool again
            row = self.queue.get_nowait()
            self.in_hand.discard(row.id)
            unsent.append(Start(row, row.attempts + 1, now()))
        self.spool.release(unsent)
        if busy > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    while len(self.in_hand) > 0:
                        await self.wake.wait()
                        self.wake.clear()
        for worker in workers:
            worker.cancel()


async def serve(settings: Settings) -> None:
    """Run a daemon until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(settings)
    try:
        await daemon.run(stop)
    finally:
        daemon.close()
