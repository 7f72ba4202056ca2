"""An aiosmtpd relay on 127.0.0.1 that fails as real relays do, for tests of relay health.

A `RelayServer` is a `SmtpServer` (every fault of that one works here too) that can also greet
every connection with a reply such as `421 4.3.2 Service not available` and hang up, accept
connections and never greet (a hung relay), and require a login (AUTH PLAIN/LOGIN over plain
text, as aiosmtpd allows with `auth_require_tls=False`), answering a wrong one with 535. It
counts every TCP connection it accepts, greeted or not.
"""

import asyncio
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from tests.smtp_server import SmtpServer, _Controller, _Handler

HANG_SECONDS = 60.0  # a hung session is closed by the server after this, whatever happens


class RelayServer(SmtpServer):
    """A capture server with relay failures switched on and off from the test thread."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.greeting: str | None = None  # said instead of 220, then the connection is closed
        self.hang = False  # accept connections and never greet
        self.login: tuple[str, str] | None = None  # (username, password) that AUTH accepts
        self._accepted = 0

    @property
    def accepted(self) -> int:
        """TCP connections accepted so far, greeted or not."""
        with self._changed:
            return self._accepted

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError(f"relay test server on port {self.port} is already running")
        controller = _RelayController(_Handler(self), self._bound_socket(), self)
        controller.start()
        self._controller = controller

    def _count_connection(self) -> None:
        with self._changed:
            self._accepted += 1

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.login is not None
            and (data.login.decode(), data.password.decode()) == self.login
        )
        return AuthResult(success=ok, handled=False)  # a failure gets aiosmtpd's own 535


class _RelayController(_Controller):
    def __init__(self, handler: _Handler, sock: socket.socket, relay: RelayServer) -> None:
        super().__init__(handler, sock)
        self.relay = relay

    def factory(self) -> SMTP:
        relay = self.relay
        with warnings.catch_warnings():  # AUTH without TLS: on loopback, for the test
            warnings.simplefilter("ignore")
            return self._session(relay)

    def _session(self, relay: RelayServer) -> SMTP:
        return _RelaySmtp(
            relay,
            self.handler,
            hostname="smtp.test",
            authenticator=relay._authenticate if relay.login else None,
            auth_require_tls=False,
            auth_required=relay.login is not None,
        )


class _RelaySmtp(SMTP):
    """aiosmtpd's session, with the greeting faults of its relay."""

    def __init__(self, relay: RelayServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._relay = relay

    async def _handle_client(self) -> None:
        relay = self._relay
        relay._count_connection()
        if relay.hang:
            await asyncio.sleep(HANG_SECONDS)
        elif relay.greeting is not None:
            await self.push(relay.greeting)
        else:
            await super()._handle_client()
            return
        assert self.transport is not None
        self.transport.close()


@pytest.fixture
def relay_server() -> Iterator[RelayServer]:
    """A running `RelayServer` on a free port, stopped after the test."""
    server = RelayServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
