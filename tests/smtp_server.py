"""A real aiosmtpd server on 127.0.0.1 with faults injected per test.

aiosmtpd's `Controller` runs the server on its own thread and event loop, so it serves a test's
own `asyncio.run()` and a daemon running in a separate process alike, over real TCP. Faults
(refused recipients, 4xx/5xx on DATA, dropped connections, slow replies) are set from the test
thread and read by the server thread under one lock.

Typical use, with the `smtp_server` fixture::

    smtp_server.fail_data_per_message(times=2)   # 451 twice for each Message-ID, then accept
    ...                                          # let the daemon deliver 3 messages
    messages = smtp_server.wait_for(3)           # returns as soon as 3 have arrived

A server can also start "down" and come up later on the same port::

    server = SmtpServer(port=free_port())        # nothing listens yet; point the daemon here
    ...
    server.start()
"""

import asyncio
import email
import email.policy
import errno
import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Self, cast

import pytest
from aiosmtpd.controller import Controller

HOST = "127.0.0.1"
# Ports handed out for later use sit below Linux's ephemeral range (32768-60999): an outgoing
# connection can take an unbound ephemeral port and make a later bind fail with EADDRINUSE.
_PORT_RANGE = (20000, 32767)

MessageFilter = Callable[[EmailMessage], bool]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to right now (below the ephemeral range)."""
    for _ in range(200):
        port = random.randint(*_PORT_RANGE)
        try:
            _bind(port).close()
        except OSError:
            continue
        return port
    with _bind(0) as sock:  # an unusually crowded host: let the kernel choose
        return cast(int, sock.getsockname()[1])


def _bind(port: int) -> socket.socket:
    """A listening-ready socket bound to HOST:port, as the server itself will bind it."""
    # IPPROTO_TCP named, as getaddrinfo names it for asyncio's own servers: only then does
    # asyncio set TCP_NODELAY on the connections, and replies are not held back by Nagle.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Same as asyncio's servers: a restart on the port of a just-stopped server must not trip
    # over connections of the old one still in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class ReceivedMessage:
    """A message the server accepted: the envelope, the raw bytes, and the parsed message."""

    envelope_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: EmailMessage

    @property
    def message_id(self) -> str | None:
        value = self.message["Message-ID"]
        return None if value is None else str(value)


@dataclass
class _DataFailure:
    """Answer DATA with `reply` `times` times: in total, or for each distinct message."""

    times: int
    reply: str
    per_message: bool
    match: MessageFilter | None
    used: int = 0
    used_by_message: dict[str, int] = field(default_factory=dict, repr=False)


@dataclass
class _Faults:
    """What the server does wrong; `SmtpServer` guards it with its lock."""

    refused: dict[str, str]
    data_failure: _DataFailure | None = None
    drops: int = 0
    slow_seconds: float = 0.0
    slow_times: int = 0


class _Handler:
    """aiosmtpd hooks; they run on the server's thread."""

    def __init__(self, server: "SmtpServer") -> None:
        self._server = server

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        self._server._note_session(session)
        if self._server.pipelining:  # aiosmtpd reads pipelined commands but does not say so
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self._server._note_session(session)
        return f"250 {server.hostname}"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._server._recipient_reply(address)
        if reply is None:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = cast(bytes, envelope.original_content)
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        key = _message_key(data, parsed)
        delay, drop, reply = self._server._data_fault(key, parsed)
        if delay:
            await asyncio.sleep(delay)
        if drop:
            server.transport.close()
            return "421 4.4.2 Connection dropped by the test"  # never reaches the client
        if reply is not None:
            return reply
        received = ReceivedMessage(envelope.mail_from, tuple(envelope.rcpt_tos), data, parsed)
        return self._server._accept(received, key)


class _Controller(Controller):
    """A Controller that serves on a socket we bound ourselves.

    aiosmtpd binds inside its thread and, when that fails, reports it only after the whole
    `ready_timeout`; binding first makes EADDRINUSE immediate and leaves no window in which
    another process can take the port.
    """

    def __init__(self, handler: _Handler, sock: socket.socket) -> None:
        # server_hostname: otherwise every connection calls socket.getfqdn(), a DNS lookup
        # that blocks the server's loop on hosts with slow resolvers.
        super().__init__(
            handler,
            hostname=HOST,
            port=sock.getsockname()[1],
            server_hostname="smtp.test",
            ready_timeout=10.0,
        )
        self._sock = sock

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


class SmtpServer:
    """A capture SMTP server on 127.0.0.1 with injectable faults.

    `port=None` picks a free port; an explicit port is used as given, so a server can be
    stopped and started again on the port a daemon was told about. Also a context manager.
    `pipelining=False` leaves PIPELINING out of EHLO: clients then send in lockstep.
    """

    def __init__(self, port: int | None = None, *, pipelining: bool = True) -> None:
        self.pipelining = pipelining  # offered in EHLO, as every relay of note does
        self._explicit_port = port is not None
        self._port = port if port is not None else free_port()
        self._controller: _Controller | None = None
        self._changed = threading.Condition()  # guards all state below, notified on arrivals
        self._messages: list[ReceivedMessage] = []
        self._data_attempts: list[tuple[str, str]] = []
        self._connections = 0
        self._faults = _Faults(refused={})

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        """Listen on `port`; returns once the server answers connections."""
        if self._controller is not None:
            raise RuntimeError(f"SMTP test server on port {self._port} is already running")
        controller = _Controller(_Handler(self), self._bound_socket())
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop listening and close every open session; faults and messages are kept."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bound_socket(self) -> socket.socket:
        for _ in range(5):
            try:
                return _bind(self._port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if self._explicit_port:
                    raise OSError(
                        exc.errno,
                        f"SMTP test server: port {self._port} is taken by another process; "
                        "pass port=free_port() or port=None",
                    ) from exc
                self._port = free_port()  # nobody has been told about the old one yet
        raise OSError(errno.EADDRINUSE, "SMTP test server: no free port after 5 tries")

    # -- what arrived ------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The messages accepted so far, oldest first (a copy)."""
        with self._changed:
            return list(self._messages)

    @property
    def connections_opened(self) -> int:
        """Sessions that said EHLO or HELO (the readiness probe of `start()` does not count)."""
        with self._changed:
            return self._connections

    @property
    def data_attempts(self) -> list[tuple[str, str]]:
        """Every DATA command as (Message-ID or digest, reply or "dropped"), failures included."""
        with self._changed:
            return list(self._data_attempts)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least `count` messages were accepted; returns all of them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(self._timeout_message(count, timeout))
                self._changed.wait(left)
            return list(self._messages)

    def _timeout_message(self, count: int, timeout: float) -> str:
        state = "running" if self.running else "NOT running (start() it?)"
        return (
            f"SMTP test server on {HOST}:{self._port} ({state}): expected {count} message(s) "
            f"within {timeout:g} s, {len(self._messages)} arrived; "
            f"{self._connections} connection(s), {len(self._data_attempts)} DATA attempt(s), "
            f"last replies {[reply for _, reply in self._data_attempts[-3:]]}; "
            f"faults: {self._faults}"
        )

    # -- faults ------------------------------------------------------------------------------

    def refuse_recipient(self, addr: str, reply: str = "550 5.1.1 No such user") -> None:
        """Answer RCPT TO:<addr> with `reply` until reset; "450 4.2.0 Greylisted" is temporary."""
        with self._changed:
            self._faults.refused[addr.lower()] = reply

    def fail_data(
        self,
        times: int = 1,
        reply: str = "451 4.3.0 Try again later",
        *,
        per_message: bool = False,
        match: MessageFilter | None = None,
    ) -> None:
        """Answer the next `times` DATA commands with `reply` (replacing any earlier rule).

        `per_message=True`: the first `times` attempts of each distinct message (by Message-ID)
        fail, and later ones succeed. `match`: only messages it returns True for are failed.
        """
        with self._changed:
            self._faults.data_failure = _DataFailure(times, reply, per_message, match)

    def fail_data_per_message(
        self, times: int = 2, reply: str = "451 4.3.0 Try again later"
    ) -> None:
        """Each message's first `times` DATA attempts get `reply`, then it is accepted."""
        self.fail_data(times, reply, per_message=True)

    def drop_connection(self, times: int = 1) -> None:
        """Close the connection at DATA (no reply) for the next `times` messages."""
        with self._changed:
            self._faults.drops = times

    def slow_reply(self, seconds: float, times: int = 1) -> None:
        """Delay the DATA reply of the next `times` messages by `seconds`, then accept them."""
        with self._changed:
            self._faults.slow_seconds, self._faults.slow_times = seconds, times

    def reset_faults(self) -> None:
        """Behave like a healthy server again."""
        with self._changed:
            self._faults = _Faults(refused={})

    # -- called by the handler on the server thread ------------------------------------------

    def _note_session(self, session: Any) -> None:
        if getattr(session, "_counted_by_test_server", False):
            return  # a second EHLO on one connection (after STARTTLS or RSET) is no new one
        session._counted_by_test_server = True
        with self._changed:
            self._connections += 1

    def _recipient_reply(self, address: str) -> str | None:
        with self._changed:
            return self._faults.refused.get(address.lower())

    def _data_fault(self, key: str, parsed: EmailMessage) -> tuple[float, bool, str | None]:
        """(delay, drop the connection, reply instead of accepting) for this DATA command."""
        with self._changed:
            faults = self._faults
            delay = 0.0
            if faults.slow_times > 0:
                faults.slow_times -= 1
                delay = faults.slow_seconds
            if faults.drops > 0:
                faults.drops -= 1
                self._data_attempts.append((key, "dropped"))
                return delay, True, None
            reply = _take_failure(faults.data_failure, key, parsed)
            if reply is not None:
                self._data_attempts.append((key, reply))
            return delay, False, reply

    def _accept(self, received: ReceivedMessage, key: str) -> str:
        with self._changed:
            self._messages.append(received)
            reply = f"250 2.0.0 Ok queued as {len(self._messages)}"
            self._data_attempts.append((key, reply))
            self._changed.notify_all()
        return reply


def _message_key(data: bytes, parsed: EmailMessage) -> str:
    """The Message-ID, else a digest of the bytes: what "the same message" means to faults."""
    message_id = parsed["Message-ID"]
    return str(message_id) if message_id is not None else hashlib.sha256(data).hexdigest()


def _take_failure(failure: _DataFailure | None, key: str, parsed: EmailMessage) -> str | None:
    """The failure reply for this DATA, counting it, or None to let the message through."""
    if failure is None or (failure.match is not None and not failure.match(parsed)):
        return None
    if failure.per_message:
        used = failure.used_by_message.get(key, 0)
        if used >= failure.times:
            return None
        failure.used_by_message[key] = used + 1
        return failure.reply
    if failure.used >= failure.times:
        return None
    failure.used += 1
    return failure.reply


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A running `SmtpServer` on a free port, stopped after the test."""
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
