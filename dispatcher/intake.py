"""The daemon's front door: frames from ZeroMQ and spill files into the spool, then receipts.

Intake waits for the socket to become readable, then drains it without awaiting per message
and commits the batch in one transaction; only then are receipts for the batch published, so a
receipt always means "in the spool". The overflow folder is read into the spool the same way.
"""

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import orjson
import zmq
import zmq.asyncio

from dispatcher import curve, overflow, wire
from dispatcher.errors import DispatcherError, InvalidRequest, StartupError
from dispatcher.observer import Observer
from dispatcher.settings import Settings
from dispatcher.spool import Incoming, Spool, now

log = logging.getLogger(__name__)

RECEIVE_HWM = 50_000
BATCH = 1000  # frames per intake transaction: one fsync for many requests
RECEIPT_HWM = 100_000  # receipts queued per subscriber before PUB drops (a drop = a re-send)
OVERFLOW_SCAN = 1.0  # seconds between looks at the overflow folder
REBIND_RETRY = 0.01  # seconds between attempts to bind an endpoint again after a reload
REBIND_PATIENCE = 2.0  # seconds of failed attempts before that is logged as an error


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
    ) -> None:
        """`has_template` answers "is there such a template?"; `stored` is told when a batch
        added requests, so delivery looks at the spool at once."""
        for key in ("bind", "acks"):
            curve.check_bind_allowed(
                f"intake.{key}", getattr(settings.intake, key), settings.intake.curve
            )
        self.settings = settings
        self.spool = spool
        self.observer = observer
        self.has_template = has_template
        self.stored = stored
        self.gate: curve.Gatekeeper | None = None
        self.pull = context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        # Frames up to twice the protocol limit still arrive, to be rejected with their size;
        # anything larger makes libzmq drop the sender's connection instead of allocating it.
        self.pull.setsockopt(zmq.MAXMSGSIZE, 2 * wire.MAX_FRAME_BYTES)
        # A deep receive queue absorbs bursts instead of pushing back on clients, whose sends
        # would then fail with "no daemon reachable".
        self.pull.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.receipts = context.socket(zmq.PUB)
        self.receipts.setsockopt(zmq.LINGER, 200)
        self.receipts.setsockopt(zmq.SNDHWM, RECEIPT_HWM)
        try:
            self.bind(context)
        except DispatcherError:  # an address in use, or a key or allowlist that cannot be read
            self.close()
            raise
        self.drain_socket: zmq.Socket[bytes] = zmq.Socket.shadow(self.pull.underlying)
        self.overflow_complaint = ""

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
        """Wait for readiness, then drain and store in batches (far faster than awaiting each)."""
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

    def drain(self) -> None:
        """At shutdown: store what already arrived (at most RECEIVE_HWM frames), drop nothing."""
        for _ in range(RECEIVE_HWM // BATCH + 1):
            if self.store_pending() < BATCH:
                break

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
        self.observer.count(received=len(added), rejected=len(rejected))
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
        """Publish `"<client> <id> <id> ..."` per client; never blocks (PUB drops instead)."""
        for client, ids in receipts.items():
            for start in range(0, len(ids), BATCH):
                frame = " ".join([client, *ids[start : start + BATCH]]).encode()
                with contextlib.suppress(zmq.Again):
                    self.receipts.send(frame, zmq.NOBLOCK)

    # -- the overflow folder -----------------------------------------------------------

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
