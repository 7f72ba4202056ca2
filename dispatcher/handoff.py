"""Handing requests to daemons without losing one: pending until receipt, re-send, spill.

A request stays pending until a daemon publishes a receipt, which it does only after its commit.
Without one after `client.ack_timeout` it is sent once more; without one again it is written to
the overflow folder, which daemons ingest. A request that no daemon could take (none connected,
send queue full) waits up to `client.ack_timeout` for one, then is spilled the same way. The
caller's thread only checks, sends without blocking, records, and forgets a few acknowledged
requests; one background thread does the rest. Fork-safe: a child never touches its parent's
`Handoff` (threads do not survive `fork()`).
"""

import collections
import functools
import itertools
import logging
import os
import threading
import time
from pathlib import Path

import orjson
import zmq

from dispatcher import overflow
from dispatcher.awaiting import Awaiting
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

# How long a process may wait at exit for bytes still in ZeroMQ's queue; everything not yet
# acknowledged is spilled by then anyway, so this only bounds the close itself.
LINGER_MS = 200
# Frames ZeroMQ queues per daemon before a send fails with Again (the request then waits in
# `unsent`): a burst of this many is handed over by the caller itself. ~15 MB of 150-byte frames.
SEND_HWM = 100_000
TICK = 0.05  # seconds between the background thread's checks when no receipt arrives
GATHER = 0.01  # seconds the background thread lets receipts gather between two batches
HANDSHAKE_GRACE = 1.0  # seconds to wait for the other daemons' receipts after the first
# While receipts keep coming a daemon is committing, only behind: a burst of 100,000 requests
# takes seconds to store. Then a request waits up to PATIENCE x ack_timeout before it is sent
# again, instead of doubling the daemon's work (measured: 59k re-sends, 23k spilled, for one
# 100k burst). With no receipt for `ack_timeout`, the plain timeout applies.
PATIENCE = 5
# Acknowledged requests a call forgets (see `_forget`): more than one, so that the receipts of a
# burst are forgotten by the calls after it.
FORGET_PER_CALL = 4
OVERFLOW_LEASE = 10.0  # a spill file touched this recently is being handed over by someone
# A spill file handed over without a receipt waits twice as long each time, up to this many
# seconds (a daemon that cannot store, for one): re-sending it every lease cost CPU and memory.
HAND_OVER_LONGEST = 300.0


# A request not handed over yet: its frame and the time.monotonic() it was made at.
Unsent = tuple[bytes, float]


class Handoff:
    """The process's sockets to the daemons, its pending requests and their keeper thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.client
        self.client_id = os.urandom(8).hex()  # not `secrets`: it costs an import ~4 ms
        self.sequence = itertools.count(1)  # next() is atomic under the GIL
        self.context = zmq.Context()
        self.push = self._push_socket()
        self.receipts = self._receipts_socket()
        # A receipt published before our subscription reaches the daemon is lost, and a lost
        # receipt means a re-send, which with several daemons may go to another one and be
        # delivered twice. So requests wait (briefly, in `unsent`) until the receipts socket
        # has completed a handshake with a daemon; the subscription goes out right after it.
        # With several daemons it waits for all of them, or for HANDSHAKE_GRACE after the first
        # when another is down.
        self.listening = threading.Event()
        self.handshakes = self.receipts.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.handshakes_seen = 0
        self.first_handshake_at: float | None = None
        self.deaf_since: float | None = time.monotonic()  # None once listening or warned
        for endpoint in self.settings.acks:
            self.receipts.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.receipts, zmq.POLLIN)
        self.poller.register(self.handshakes, zmq.POLLIN)
        self.lock = threading.Lock()  # the push socket, and pending/unsent as one state
        self.changed = threading.Condition(self.lock)  # a request acknowledged or spilled
        self.pending = Awaiting()  # handed over, not yet acknowledged
        # Ids whose receipts came and that are still in `pending`: see `_forget`.
        self.acknowledged: collections.deque[str] = collections.deque()
        self.calls = 0  # submit() calls ever: the keeper forgets for a caller that is idle
        self.calls_seen = 0  # `calls` at the keeper's last look
        self.emptied: list[Path] = []  # spill files whose requests all came: to remove
        # Not handed over: no daemon connected yet (a fresh socket needs its connection first)
        # or its queue full. The keeper sends them as soon as it can, or spills them.
        self.unsent: dict[str, Unsent] = {}
        self.spilling = 0  # frames being written by a thread right now
        self.spilled = 0  # frames spilled since the last flush()
        self.resent = 0  # frames sent a second time for want of a receipt (ever)
        self.receipt_at = float("-inf")  # time.monotonic() of the last receipt
        self.not_mine: set[str] = set()  # spill files sealed by another key: theirs to send
        # Spill files handed over in vain: their name -> (how often, when to try again).
        self.unanswered: dict[str, tuple[int, float]] = {}
        self.spill_error = ""  # why the last spill failed; "" once one succeeds
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._keep, name="dispatcher-handoff", daemon=True)
        self.thread.start()

    def _push_socket(self) -> zmq.Socket[bytes]:
        push = self.context.socket(zmq.PUSH)
        # IMMEDIATE: queue only on live connections, so "no daemon" is an error we see
        # (zmq.Again) rather than frames piling up for a peer that may never come.
        push.setsockopt(zmq.IMMEDIATE, 1)
        push.setsockopt(zmq.SNDHWM, SEND_HWM)
        push.setsockopt(zmq.LINGER, LINGER_MS)
        self._secure(push)
        for endpoint in self.settings.connect:
            push.connect(endpoint)
        return push

    def _receipts_socket(self) -> zmq.Socket[bytes]:
        """Subscribed to this client's receipts; connected once its monitor is in place."""
        receipts = self.context.socket(zmq.SUB)
        receipts.setsockopt(zmq.LINGER, 0)
        # Receipts wait here between the keeper's batches; one dropped means a needless re-send.
        receipts.setsockopt(zmq.RCVHWM, SEND_HWM)
        receipts.setsockopt(zmq.SUBSCRIBE, self.client_id.encode() + b" ")
        self._secure(receipts)
        return receipts

    def _secure(self, socket: zmq.Socket[bytes]) -> None:
        if self.settings.curve is not None:  # imported only then: it costs a first call ~15 ms
            from dispatcher.curve import secure_client_socket

            secure_client_socket(socket, self.settings)

    @functools.cached_property
    def seal(self) -> overflow.Seal | None:
        """Under CURVE, spill files are sealed with this client's key (`overflow.Seal`); made
        at the first spill or hand-over, so that a start does not pay for its X25519."""
        if self.settings.curve is None:
            return None
        from dispatcher.curve import spill_seal

        return spill_seal(self.settings)

    # -- the caller's side -------------------------------------------------------------

    def new_id(self) -> str:
        """A request id unique across processes without coordination, cheaper than a uuid4:
        the random client id (new in every process, forks included) and a count."""
        return f"{self.client_id}-{next(self.sequence)}"

    def submit(self, request_id: str, frame: bytes) -> None:
        """Send without blocking and keep the request until its receipt comes."""
        sent_at = time.monotonic()
        with self.lock:
            self.calls += 1
            self._forget(FORGET_PER_CALL)
            if self.listening.is_set() and not self.unsent and self._send(frame):
                self.pending.add(request_id, frame, sent_at)
            else:
                self.unsent[request_id] = (frame, sent_at)

    def flush(self, timeout: float) -> bool:
        """Wait until every request is acknowledged or spilled; True if all were acknowledged.

        What is still unacknowledged at the deadline is spilled before returning, so after a
        flush every request of the process is in a spool or in the overflow folder, unless that
        folder cannot be written: those stay in memory, are tried again, and make it False.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self.lock:
            self._forget()
            while self._own_pending() or self.spilling:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(min(left, TICK))
                self._forget()
        self._spill_all()
        with self.lock:
            spilled, self.spilled = self.spilled, 0
            return spilled == 0 and not self._own_pending()

    def close(self, wait: float) -> None:
        """At exit: wait up to `wait` seconds for receipts, spill the rest, release sockets."""
        self.stopping.set()
        self.thread.join(timeout=5.0)
        deadline = time.monotonic() + wait
        while self._worth_waiting() and time.monotonic() < deadline:
            self._listen()
        self._spill_all()
        self._remove_emptied()
        if self.unsent:
            log.critical("dispatcher client: %d requests lost at exit", len(self.unsent))
        self.receipts.disable_monitor()
        self.handshakes.close()
        self.receipts.close()
        self.push.close()
        self.context.term()

    # -- the keeper thread -------------------------------------------------------------

    def _keep(self) -> None:
        """Take receipts as they come; re-send, spill and hand back spill files on time."""
        next_overflow = 0.0
        while not self.stopping.is_set():
            try:
                self._listen()
                self._check_timeouts()
                self._forget_for_an_idle_caller()
                self._remove_emptied()
                if time.monotonic() >= next_overflow:
                    next_overflow = time.monotonic() + 1.0
                    self._hand_over_spilled()
                self.stopping.wait(GATHER)
            except zmq.ContextTerminated:
                return
            except Exception:  # the keeper must outlive any one bad moment
                log.exception("dispatcher client: hand-off thread error; continuing")
                self.stopping.wait(TICK)

    def _listen(self) -> None:
        """Wait up to one tick for a handshake or receipts; then send what waited for them."""
        ready = dict(self.poller.poll(int(TICK * 1000)))
        if self.handshakes in ready:
            self.handshakes.recv_multipart()
            self.handshakes_seen += 1
            self.first_handshake_at = self.first_handshake_at or time.monotonic()
        if not self.listening.is_set() and self.first_handshake_at is not None:
            everyone = self.handshakes_seen >= len(self.settings.acks)
            if everyone or time.monotonic() - self.first_handshake_at >= HANDSHAKE_GRACE:
                self.listening.set()
        self._warn_if_deaf()
        if self.receipts in ready:
            self._take_receipts()
        self._send_unsent(send=self.listening.is_set())

    def _warn_if_deaf(self) -> None:
        """Say so when a daemon takes requests but its receipts never come: a wrong
        `client.acks` would otherwise only show as every request being spilled."""
        if self.listening.is_set() or self.deaf_since is None:
            return
        if time.monotonic() - self.deaf_since < self.settings.ack_timeout:
            return
        with self.lock:
            connected = bool(self.push.poll(0, zmq.POLLOUT))
        if connected:
            self.deaf_since = None
            log.warning(
                "dispatcher client: a daemon is connected but no receipts socket answers at"
                " client.acks %s; requests go to %s until one does",
                ", ".join(self.settings.acks),
                self.settings.overflow_dir,
            )

    def _take_receipts(self) -> None:
        """Drain the receipts socket: `"<client> <id> <id> ..."` per committed batch."""
        done: list[str] = []
        while True:
            try:
                done += self.receipts.recv(zmq.NOBLOCK).decode().split(" ")[1:]
            except zmq.Again:
                break
        if done:
            self.receipt_at = time.monotonic()
            self.unanswered.clear()  # a daemon acknowledges again: hand spill files over now
        self.acknowledged.extend(done)
        with self.lock:
            self.changed.notify_all()

    def _forget_for_an_idle_caller(self) -> None:
        """Forget every acknowledged request once no call came since the keeper's last look:
        then nobody waits for the GIL, and memory is given back without a flush()."""
        with self.lock:
            if self.calls == self.calls_seen and self.acknowledged:
                self._forget()
            self.calls_seen = self.calls

    def _remove_emptied(self) -> None:
        """Remove the spill files whose every request was acknowledged."""
        with self.lock:
            emptied, self.emptied = self.emptied, []
        for path in emptied:
            overflow.remove(path)

    def _forget(self, most: int | None = None) -> None:
        """Drop acknowledged requests from `pending` (caller holds the lock).

        The caller's thread forgets a few on each call, the keeper only the rest once calls
        stop: a batch of a thousand receipts is Python work that holds the GIL, and a call
        waiting for it was the slowest one in a thousand (`benchmarks/enqueue.py`)."""
        acknowledged, pending = self.acknowledged, self.pending
        count = len(acknowledged) if most is None else min(most, len(acknowledged))
        for _ in range(count):
            emptied = pending.acknowledge(acknowledged.popleft())
            if emptied is not None:
                self.emptied.append(emptied)  # removed by the keeper, off the caller's path

    def _check_timeouts(self) -> None:
        """Send once more what had no receipt in time; spill what had none twice."""
        now, timeout = time.monotonic(), self.settings.ack_timeout
        if now - self.receipt_at < timeout:  # receipts are coming: the daemon is only behind
            timeout *= PATIENCE
        expired_frames: list[bytes] = []
        with self.lock:
            oldest = self.pending.oldest_sent_at()
            if oldest is not None and oldest + timeout <= now:
                self._forget()  # an acknowledged request is not late, only not yet forgotten
            own, files = self.pending.take_late(now, timeout)
            for source in files:  # durable already: each file is retried, later
                self._back_off(source.name, now)
            for request_id, frame, resent in own:
                if not resent and self._send(frame):
                    self.resent += 1
                    self.pending.add(request_id, frame, now, resent=True)
                else:
                    expired_frames.append(frame)
            self.spilling += len(expired_frames)
        self._spill(expired_frames)

    def _send_unsent(self, *, send: bool = True) -> None:
        """Hand over what waited for a connection; spill what waited `ack_timeout` in vain."""
        now, timeout = time.monotonic(), self.settings.ack_timeout
        spill: list[bytes] = []
        with self.lock:
            for request_id, (frame, sent_at) in list(self.unsent.items()):
                if sent_at + timeout <= now:
                    spill.append(frame)
                elif not (send and self._send(frame)):
                    break  # still no room (or not listening yet): the younger ones wait too
                else:
                    self.pending.add(request_id, frame, now)
                del self.unsent[request_id]
            self.spilling += len(spill)
        self._spill(spill)

    def _hand_over_spilled(self) -> None:
        """Hand spilled requests over again once a daemon is reachable, one file at a time.

        Only once receipts can reach us: a file's requests sent before would wait out
        `ack_timeout` for receipts lost on the way, and the file its lease of OVERFLOW_LEASE."""
        if not self.listening.is_set():
            return
        with self.lock:
            if self.pending.files or not self.push.poll(0, zmq.POLLOUT):
                return
        files = overflow.waiting(self.settings.overflow_dir)
        names = {path.name for path in files}
        self.not_mine.intersection_update(names)
        self.unanswered = {n: due for n, due in self.unanswered.items() if n in names}
        for path in files:
            if path.name in self.not_mine or self._backing_off(path.name):
                continue
            try:
                if path.stat().st_mtime > time.time() - OVERFLOW_LEASE:
                    continue
                path.touch()  # a lease: other processes leave this file alone for a while
            except FileNotFoundError:
                continue
            spilled = overflow.load(path)
            if spilled is not None and not self._mine(spilled):
                self.not_mine.add(path.name)
                continue
            if spilled is not None and spilled.frames:
                self._resend_file(path, spilled.frames)
            return

    def _back_off(self, name: str, now: float) -> None:
        """A handed-over spill file got no receipt in time: wait twice as long as the last
        time before the next try (caller holds the lock)."""
        tries = self.unanswered.get(name, (0, 0.0))[0] + 1
        self.unanswered[name] = (tries, now + min(OVERFLOW_LEASE * 2**tries, HAND_OVER_LONGEST))

    def _backing_off(self, name: str) -> bool:
        return self.unanswered.get(name, (0, 0.0))[1] > time.monotonic()

    def _mine(self, spilled: overflow.Spilled) -> bool:
        """Whether this client may hand a spill file over: any without CURVE; under CURVE only
        one sealed by its own key, so that a refused client's file never rides on its
        connection (the daemon or its owner takes the others)."""
        if self.seal is None:
            return True
        return spilled.signer == self.seal.public_key and spilled.sealed_with(self.seal.mac_key)

    def _resend_file(self, path: Path, frames: list[bytes]) -> None:
        with self.lock:
            for frame in frames:
                try:
                    fields = orjson.loads(frame)
                    request_id = str(fields["id"])
                    fields["client"] = self.client_id  # the receipt must come to us
                    frame = orjson.dumps(fields)
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue  # a daemon ingesting the folder records it as rejected
                if not self._send(frame):
                    break
                self.pending.add(request_id, frame, time.monotonic(), source=path)

    # -- helpers -----------------------------------------------------------------------

    def _send(self, frame: bytes) -> bool:
        """Hand one frame to ZeroMQ without blocking (caller holds the lock)."""
        try:
            self.push.send(frame, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # Again: no daemon connected or its queue full; or closed
            return False

    def unsaved(self) -> int:
        """Requests held only in this process's memory: not acknowledged, not spilled."""
        with self.lock:
            self._forget()
            return len(self.unsent) + self.pending.own()

    def _awaiting_receipt(self) -> bool:
        """Handed over, not yet acknowledged, and not from a spill file (those are durable)."""
        return self.pending.own() > 0

    def _own_pending(self) -> bool:
        """Requests of this process not yet durable anywhere."""
        return bool(self.unsent) or self._awaiting_receipt()

    def _worth_waiting(self) -> bool:
        """At exit: a receipt may still come, or a connected daemon can take what waits."""
        with self.lock:
            self._forget()
            connected = bool(self.unsent and self.push.poll(0, zmq.POLLOUT))
            return self._awaiting_receipt() or connected

    def _spill_all(self) -> None:
        with self.lock:
            self._forget()
            frames = [frame for frame, _ in self.unsent.values()]
            self.unsent.clear()
            frames += self.pending.take_own()
            self.spilling += len(frames)
        self._spill(frames)

    def _spill(self, frames: list[bytes]) -> None:
        """Write frames to the overflow folder, outside the lock: the fsync takes milliseconds."""
        if not frames:
            return
        folder = self.settings.overflow_dir
        try:
            path = overflow.spill(folder, frames, self.client_id, self.seal)
        except OSError as exc:
            if not self.spill_error:  # once, until a spill succeeds again
                log.critical(
                    "dispatcher client: cannot write %d requests to client.overflow_dir %s: %s;"
                    " keeping them in memory and trying again (flush() returns False meanwhile)",
                    len(frames),
                    folder,
                    exc,
                )
            self.spill_error = str(exc)
            with self.lock:
                for frame in frames:  # kept, and tried again when the keeper next looks
                    request_id = str(orjson.loads(frame)["id"])
                    self.unsent[request_id] = (frame, time.monotonic())
                self.spilling -= len(frames)
                self.changed.notify_all()
            return
        if self.spill_error:
            self.spill_error = ""
            log.warning("dispatcher client: client.overflow_dir %s can be written again", folder)
        log.warning("dispatcher client: %d requests unacknowledged; kept in %s", len(frames), path)
        with self.lock:
            self.spilling -= len(frames)
            self.spilled += len(frames)
            self.changed.notify_all()
