"""The daemon's front door: frames from ZeroMQ and spill files into the spool, then receipts.

Intake waits for the socket to become readable, then drains it without awaiting per message
and commits the batch in one transaction; only then are receipts for the batch published, so a
receipt always means "in the spool". The overflow folder is read into the spool the same way.
While the store cannot take a batch, intake holds that one batch, reads no more and tries again.
"""

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import zmq
import zmq.asyncio

from dispatcher import curve, overflow, wire
from dispatcher.errors import DispatcherError, InvalidRequest, StartupError, StoreUnavailable
from dispatcher.observer import Observer
from dispatcher.receipts import Receipts
from dispatcher.settings import Settings
from dispatcher.spool import Incoming, Spool, now

log = logging.getLogger(__name__)

RECEIVE_HWM = 50_000
BATCH = 1000  # frames per intake transaction: one fsync for many requests
FIRST_BATCH = 32  # frames in the first transaction of a burst (see `serve`)
# Seconds without a frame that make the next frames a new burst: a flood's momentary gaps (the
# socket drained faster than the sender fills it) keep its batches whole.
BURST_GAP = 0.01
# Loop turns left to delivery before each batch. A render result takes a few to reach the
# feeder (the executor's callback, then each task awaiting it), each SMTP reply one to reach its
# worker; with one turn, each such step of a burst's first mail waited for a whole batch
# (`benchmarks/pickup.py`). A turn with nothing to run costs microseconds; a batch, milliseconds.
DELIVERY_TURNS = 8
# Seconds intake pauses before each batch of a burst's ramp while delivery holds mail: loop
# turns alone pass only what is ready, and an SMTP reply a few hundred microseconds away (the
# relay needs the CPU too) then waited for the next batch, once per step of the first mails.
RAMP_PAUSE = 0.002
RECEIPT_HWM = 100_000  # receipts queued per subscriber before PUB drops (a drop = a re-send)
OVERFLOW_SCAN = 1.0  # seconds between looks at the overflow folder
REBIND_RETRY = 0.01  # seconds between attempts to bind an endpoint again after a reload
REBIND_PATIENCE = 2.0  # seconds of failed attempts before that is logged as an error
# Seconds the store may be unavailable before intake sheds what arrives: its clients send it
# again, into a queue whose high-water mark counts frames, not bytes (50,000 of 20 KB: 1 GB).
SHED_AFTER = 5.0


async def bind_again(socket: zmq.asyncio.Socket, endpoint: str) -> None:
    """Bind `endpoint` just unbound: libzmq closes the old listener on its I/O thread, so the
    address can be in use for a moment; retry until it is free, saying so if it takes long."""
    started = asyncio.get_running_loop().time()
    complained = False
    while True:
        try:
            socket.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            slow = asyncio.get_running_loop().time() - started > REBIND_PATIENCE
            if slow and not complained:
                log.error("cannot bind %s again yet, still trying: %s", endpoint, exc)
                complained = True
        await asyncio.sleep(REBIND_RETRY)


@dataclass(slots=True)
class Batch:
    """Frames sorted for one transaction, and the receipts owed once it has committed."""

    accepted: list[Incoming] = field(default_factory=list)
    rejected: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, frame)
    receipts: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


class Intake:
    """The PULL and PUB sockets, the CURVE gate, and the batches they commit."""

    def __init__(
        self,
        settings: Settings,
        context: zmq.asyncio.Context,
        spool: Spool,
        observer: Observer,
        has_template: Callable[[str], bool],
        stored: Callable[[], None],
        delivering: Callable[[], bool] = lambda: False,
    ) -> None:
        """`has_template` answers "is there such a template?"; `stored` is told when a batch
        added requests, so delivery looks at the spool at once; `delivering`, whether delivery
        holds mail now (claimed, not yet concluded)."""
        for key in ("bind", "acks"):
            curve.check_bind_allowed(
                f"intake.{key}", getattr(settings.intake, key), settings.intake.curve
            )
        self.settings = settings
        self.spool = spool
        self.observer = observer
        self.has_template = has_template
        self.stored = stored
        self.delivering = delivering
        self.gate: curve.Gatekeeper | None = None
        self.pull = context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the protocol limit still arrive, to be rejected with their size;
        # anything larger makes libzmq drop the sender's connection instead of allocating it.
        self.pull.setsockopt(zmq.MAXMSGSIZE, 2 * wire.MAX_FRAME_BYTES)
        # A deep receive queue absorbs bursts instead of pushing back on clients, whose sends
        # would then fail with "no daemon reachable".
        self.pull.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.receipts = context.socket(zmq.XPUB)  # it tells us who subscribed (receipts.py)
        self.receipts.setsockopt(zmq.LINGER, 200)
        self.receipts.setsockopt(zmq.SNDHWM, RECEIPT_HWM)
        self.publisher = Receipts(self.receipts, BATCH)
        try:
            self.bind(context)
        except DispatcherError:  # an address in use, or a key or allowlist that cannot be read
            self.close()
            raise
        self.drain_socket: zmq.Socket[bytes] = zmq.Socket.shadow(self.pull.underlying)
        self.shedding = False  # dropping what arrives, in a long outage
        self.shed_anonymous = 0  # frames without a client id dropped in this outage
        self.overflow_complaint = ""
        # Under CURVE, spill files count only when sealed by an allowed key (`spill_refusal`).
        self.spill_keys = (
            None if settings.intake.curve is None else curve.SpillKeys(settings.intake)
        )
        self.spill_refusals = curve.RefusalLog()

    def bind(self, context: zmq.asyncio.Context) -> None:
        """Intake and receipts, each secured by CURVE when `intake.curve` is set."""
        intake = self.settings.intake
        for socket in (self.pull, self.receipts):  # receipts follow the intake's rules
            curve.secure_server_socket(socket, intake)
        self.gate = curve.start_authenticator(context, intake, self.observer.counts)
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

    async def reload(self) -> None:
        """Re-read the CURVE allowlist (SIGHUP). ZAP only runs at a handshake, so when a key was
        removed every connection is cut (clients reconnect and are checked afresh)."""
        if self.gate is None:
            log.info("reload: nothing to reload without intake.curve (no client allowlist)")
            return
        if self.gate.reload():
            await self.rebind()

    async def rebind(self) -> None:
        """Unbind and bind again the PULL and PUB sockets, which closes their connections;
        frames that already arrived are stored first, and those still queued after."""
        self.drain()
        for socket in (self.pull, self.receipts):
            # As bound, not as configured: `tcp://*:0` keeps the port clients know.
            endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            socket.unbind(endpoint)
            self.drain()
            await bind_again(socket, endpoint)
        log.info("closed every intake and receipts connection: clients reconnect and are checked")

    def close(self) -> None:
        if self.gate is not None:
            self.gate.stop()
        self.pull.close(linger=0)
        self.receipts.close()

    async def serve(self) -> None:
        """Wait for readiness, then drain and store in batches (far faster than awaiting each).

        A burst (frames after BURST_GAP without any) starts with a small batch, and each batch
        doubles the next up to BATCH: the first requests are committed, and on their way to
        the relay, while the rest is still arriving; a flood still gets one fsync for BATCH.
        While the batches are small and delivery holds mail, each waits RAMP_PAUSE first.
        """
        batch = FIRST_BATCH
        while True:
            if not self.drain_socket.poll(0, zmq.POLLIN):
                idle_since = time.monotonic()
                await self.pull.poll()  # readable (POLLIN), no timeout
                if time.monotonic() - idle_since > BURST_GAP:
                    batch = FIRST_BATCH
            # Delivery first: the workers and the feeder this loop turn woke (a render back, a
            # reply from the relay) run before the loop is held for a whole batch, and so do
            # their next steps: each await they wake takes one more turn.
            for _ in range(DELIVERY_TURNS):
                await asyncio.sleep(0)
            if batch < BATCH and self.delivering():
                await asyncio.sleep(RAMP_PAUSE)
            await self.store_when_possible(self.receive(batch))
            batch = min(2 * batch, BATCH)

    async def store_when_possible(self, frames: list[bytes]) -> None:
        """Store a batch, trying again for as long as the store is unavailable.

        Until then nothing more is stored or acknowledged: clients keep, re-send and spill what
        has no receipt. The socket is not read for a short outage; in a longer one what arrives
        is read and dropped, so that the re-sends do not pile up in ZeroMQ's queue: memory stays
        bounded however long the store is away.
        """
        batch = self.sort(frames)
        await self.observer.store.retry(
            "intake", functools.partial(self.commit, batch), waiting=self.shed
        )
        self.shedding = False
        if self.shed_anonymous:
            log.warning(
                "%d frames without a client id were dropped while the store was unavailable"
                " (such senders get no receipt and cannot send them again)",
                self.shed_anonymous,
            )
            self.shed_anonymous = 0

    def shed(self) -> None:
        """In an outage past SHED_AFTER seconds, drop what has arrived; only a frame without a
        client id (fire-and-forget, at most once) is lost by it, and counted."""
        if self.observer.store.unavailable_for() < SHED_AFTER:
            return
        if not self.shedding:
            self.shedding = True
            log.warning("intake drops what arrives until the store is back; clients send it again")
        for _ in range(RECEIVE_HWM // BATCH + 1):
            frames = self.receive()
            self.shed_anonymous += sum(1 for frame in frames if wire.sender_of(frame) is None)
            if len(frames) < BATCH:
                return

    def receive(self, batch: int = BATCH) -> list[bytes]:
        """Up to `batch` frames that already arrived, without blocking."""
        frames = []
        for _ in range(batch):
            try:
                frames.append(self.drain_socket.recv(zmq.NOBLOCK, copy=True))
            except zmq.Again:
                break
        return frames

    def drain(self) -> None:
        """At shutdown: store what already arrived (at most RECEIVE_HWM frames), drop nothing
        that the store can take."""
        for _ in range(RECEIVE_HWM // BATCH + 1):
            frames = self.receive()
            try:
                self.store(frames)
            except StoreUnavailable as exc:  # not acknowledged: their clients keep them
                log.error("%d requests not stored: %s", len(frames), exc)
                return
            if len(frames) < BATCH:
                break

    def store(self, frames: list[bytes]) -> None:
        """Commit a batch, then acknowledge every frame in it that names its client."""
        self.commit(self.sort(frames))

    def sort(self, frames: list[bytes]) -> Batch:
        """Requests to store and frames to reject, each rejection logged once."""
        batch = Batch()
        for frame in frames:
            try:
                incoming = self.accept(frame)
            except InvalidRequest as exc:
                batch.rejected.append((str(exc), frame))
                log.warning("rejected: %s (frame of %d bytes)", exc, len(frame))
                sender = wire.sender_of(frame)
                if sender:  # recorded as rejected: the client must not send it forever
                    batch.receipts[sender[0]].append(sender[1])
                continue
            batch.accepted.append(incoming)
            if incoming.client:
                batch.receipts[incoming.client].append(incoming.id)
        return batch

    def commit(self, batch: Batch) -> None:
        """Store the batch in one transaction, then publish its receipts; `StoreUnavailable`
        when the store cannot take it (nothing is then acknowledged)."""
        if not (batch.accepted or batch.rejected):
            return
        added = set(self.spool.add(batch.accepted, batch.rejected, now()))
        self.observer.store.succeeded("intake")
        self.acknowledge(batch.receipts)
        self.log_received(batch.accepted, added)
        self.observer.count(received=len(added), rejected=len(batch.rejected))
        if added:
            self.stored()

    def accept(self, frame: bytes) -> Incoming:
        """Check a frame's shape (a few µs; the full check runs when it is rendered, in a
        render worker) and make it a row for the spool."""
        fields = wire.parse(frame)
        wire.check(fields, len(frame))
        if "template" in fields and not self.has_template(fields["template"]):
            raise InvalidRequest(f"template: unknown template {fields['template']!r}")
        if fields.get("id") is None:  # a foreign sender may leave naming it to us
            fields["id"] = wire.new_id()
            frame = orjson.dumps(fields)
        return Incoming.from_fields(fields, frame)

    def log_received(self, accepted: list[Incoming], added: set[str]) -> None:
        """One INFO line per batch, one DEBUG line per request: a line each would cost a third
        of the intake's CPU and overrun journald's rate limit."""
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
        """Publish `"<client> <id> <id> ..."` per client; never blocks (held or dropped)."""
        for client, ids in receipts.items():
            self.publisher.publish(client, ids)

    # -- the overflow folder -----------------------------------------------------------

    async def ingest_overflow(self) -> None:
        """Read spill files into the spool, at start and then every OVERFLOW_SCAN seconds."""
        while True:
            for path in self.overflow_files():
                try:
                    await self.ingest(path)
                except StoreUnavailable as exc:  # the file stays, for a later scan
                    self.observer.store.failed("intake", exc)
                    break
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
        """Commit one spill file's requests, then delete it (never before the commit).

        Under CURVE a file not sealed by an allowed client is moved into `refused/` instead.
        """
        try:
            spilled = overflow.load(path)
            if spilled is None:
                return  # another daemon or a client took it first
            refusal = self.spill_refusal(spilled)
            if refusal is not None:
                self.refuse_spill(path, spilled.signer, refusal)
                return
            frames = spilled.frames
            for start in range(0, len(frames), BATCH):
                self.store(frames[start : start + BATCH])
                await asyncio.sleep(0)  # a large file must not hold up the loop
            overflow.remove(path)
        except OSError as exc:
            log.error("cannot ingest overflow file %s: %s", path, exc)
            return
        log.info("ingested %d requests from overflow file %s", len(frames), path.name)

    def spill_refusal(self, spilled: overflow.Spilled) -> str | None:
        """Why a spill file must not be sent; None when it may (always, without CURVE: only
        local processes can reach the daemon then, as they can write the folder)."""
        if self.spill_keys is None or self.gate is None:
            return None
        if spilled.signer is None:
            return "not sealed (no valid #hmac-sha256 line; is client.curve set?)"
        if spilled.signer not in self.gate.allowed.values():
            return "its key is not in intake.curve.authorized_keys_dir"
        if not spilled.sealed_with(self.spill_keys.mac_key(spilled.signer)):
            return "its MAC does not match (altered, or sealed for another server key)"
        return None

    def refuse_spill(self, path: Path, signer: bytes | None, reason: str) -> None:
        """Keep a refused spill file in `refused/` for a person to look at; never send it."""
        key = "none" if signer is None else signer.decode()  # 40 printable characters
        try:
            kept = overflow.set_aside(path)
        except OSError as exc:  # left where it is, refused again at every scan: never sent
            if self.spill_refusals.due(str(path), str(exc)):
                log.error("refused overflow file %s (%s) but cannot move it: %s", path, reason, exc)
            return
        self.observer.counts["overflow_refused"] += 1
        if self.spill_refusals.due(key, reason):
            log.warning(
                "refused overflow file %s (key %s): %s; kept in %s, never sent"
                " (%d refused since start; logged once a minute per key and reason)",
                path.name,
                key,
                reason,
                kept.parent,
                self.observer.counts["overflow_refused"],
            )
