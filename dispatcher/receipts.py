"""Receipts that reach their client even when it has only just connected.

A PUB socket drops a message for a subscriber whose subscription it has not seen yet (the slow
joiner): the first receipts after a daemon (re)start, or after a client connects, went nowhere
and the client sent those requests again. On an XPUB socket the daemon reads the subscriptions
itself, so it knows whether a client can hear it: receipts for one that cannot yet are held, and
published as soon as its subscription arrives (or dropped after HOLD seconds, when the client
has sent those requests again anyway).
"""

import contextlib
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

HOLD = 10.0  # seconds a receipt waits for its client to subscribe: past its re-send by then
HOLD_IDS = 10_000  # ids held per client: ~100 ms of a flood; ~1 MB for one that never listens
SWEEP = 1.0  # seconds between looks for held receipts past HOLD


@dataclass(slots=True)
class Held:
    """Receipts for a client not subscribed yet."""

    since: float  # time.monotonic() of the first
    ids: list[str] = field(default_factory=list)


class Receipts:
    """Publishes `"<client> <id> <id> ..."` to the clients that subscribed, holds the rest."""

    def __init__(self, socket: zmq.asyncio.Socket, batch: int) -> None:
        """`socket` is an XPUB socket; at most `batch` ids go in one frame."""
        self.socket = socket
        self.sync: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        self.batch = batch
        self.subscribed: set[str] = set()  # client ids whose subscription has arrived
        self.held: dict[str, Held] = {}

    def publish(self, client: str, ids: list[str]) -> None:
        """Send now if `client` listens, else hold until it does; never blocks."""
        if client not in self.subscribed:
            self.take_subscriptions()
        if client in self.subscribed:
            self._send(client, ids)
            return
        held = self.held.setdefault(client, Held(time.monotonic()))
        held.ids += ids[: HOLD_IDS - len(held.ids)]

    async def serve(self) -> None:
        """Take subscriptions as they come and drop what was held too long."""
        while True:
            await self.socket.poll(int(SWEEP * 1000))
            self.take_subscriptions()
            self.expire()

    def take_subscriptions(self) -> None:
        """Read the XPUB's (un)subscriptions: `\\x01<client> ` or `\\x00<client> `."""
        while True:
            try:
                message = self.sync.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            client = message[1:].decode(errors="replace").rstrip(" ")
            if message[:1] == b"\x00":
                self.subscribed.discard(client)
                continue
            self.subscribed.add(client)
            held = self.held.pop(client, None)
            if held is not None:
                self._send(client, held.ids)

    def expire(self) -> None:
        too_old = time.monotonic() - HOLD
        for client in [c for c, held in self.held.items() if held.since < too_old]:
            del self.held[client]

    def _send(self, client: str, ids: list[str]) -> None:
        for start in range(0, len(ids), self.batch):
            frame = " ".join([client, *ids[start : start + self.batch]]).encode()
            with contextlib.suppress(zmq.Again):  # its queue is full: it will re-send
                self.sync.send(frame, zmq.NOBLOCK)
