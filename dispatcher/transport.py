"""SMTP delivery over one long-lived connection per worker, each outcome returned as a value.

`deliver()` never raises for SMTP or network failures: it classifies them by reply class into an
`Attempt` (2xx delivered; 4xx, disconnects and timeouts deferred; 5xx refused, per recipient).
Only programming errors and cancellation propagate.
"""

import asyncio
import contextlib
import email.utils
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

import aiosmtplib
from aiosmtplib import SMTPException, SMTPHeloError, SMTPResponseException

from dispatcher.errors import SettingsError
from dispatcher.hosts import is_loopback
from dispatcher.pipelining import Outcome, Session
from dispatcher.settings import RelaySettings

log = logging.getLogger(__name__)

# The hard deadline allows this transfer rate for the DATA payload on top of 2 x timeout, so a
# large attachment on a slow link is not cut off (and then re-sent, possibly twice delivered).
_MIN_BYTES_PER_SECOND = 64 * 1024
# QUIT is a courtesy: never let it hold up a shutdown for long.
_QUIT_TIMEOUT = 5.0
# Servers drop idle connections, sometimes silently (a NAT or firewall forgets them); a send on
# such a connection would hang until the timeout. Postfix reuses a connection for at most 300 s.
_MAX_IDLE = 60.0
# A dot-atom local part at a domain of letter-digit-hyphen labels: what nearly every envelope
# address is, and what `parseaddr` returns unchanged (tests/test_transport.py checks that).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")
_MAX_AGE = 300.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one delivery attempt did, per recipient."""

    delivered: tuple[str, ...]  # recipients the server accepted (the message went to them)
    deferred: dict[str, str]  # recipient -> reason: temporary (4xx, network, timeout): retry
    refused: dict[str, str]  # recipient -> reason: permanent (5xx): never again
    code: int | None  # the server's final reply code, None for network errors
    reply: str  # "250 2.0.0 Ok queued", "451 4.3.0 Try later", "SMTPConnectError: ..."
    # The relay failed, not this message: the session could not be opened (connect, TLS, EHLO,
    # login) or the server said 421; nothing was delivered.
    session_failed: bool = False


class SmtpConnection:
    """One SMTP connection, opened lazily and reused for many messages; an async context manager.

    Not meant to be shared between tasks: each delivery worker owns one (a lock still makes
    concurrent calls safe, but they queue). `max_idle` and `max_age` (seconds) bound how long a
    connection is reused before a fresh one is opened.
    """

    def __init__(
        self, settings: RelaySettings, *, max_idle: float = _MAX_IDLE, max_age: float = _MAX_AGE
    ) -> None:
        self._settings = settings
        self._max_idle = max_idle
        self._max_age = max_age
        self._session: Session | None = None  # aiosmtplib opened it (TLS, EHLO, login)
        self._opened_at = 0.0
        self._used_at = 0.0
        self._password: str | None = None  # only to scrub it from reasons, never logged
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        """Whether a connection to the server is open now (for the metrics)."""
        return self._session is not None and self._session.smtp.is_connected

    async def deliver(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> Attempt:
        """Send `data` (the whole message, headers included) to `recipients`; never raises for
        SMTP or network failures, which come back classified in the `Attempt`."""
        rcpts = tuple(dict.fromkeys(recipients))  # a repeated RCPT would only confuse the count
        if not rcpts:
            raise ValueError("deliver() needs at least one recipient")
        if _rewritten(envelope_from):
            reply = f"ValueError: not a plain envelope address: {envelope_from!r}"
            return _everyone(rcpts, deferred=False, code=None, reply=reply)
        bad = {
            r: f"ValueError: not a plain envelope address: {r!r}" for r in rcpts if _rewritten(r)
        }
        good = tuple(r for r in rcpts if r not in bad)
        if not good:
            return Attempt((), {}, bad, None, next(iter(bad.values())))
        async with self._lock:
            attempt = await self._deliver(envelope_from, good, data)
        self._used_at = time.monotonic()
        return self._scrubbed(replace(attempt, refused={**bad, **attempt.refused}))

    async def check(self) -> tuple[list[str], str | None]:
        """Open a session step by step as `deliver()` would (connect, TLS, EHLO, login), say
        QUIT, send nothing: the steps that worked, and the failure (None when none failed).

        For `dispatcher check --relays` and for probing a relay that is down.
        """
        settings = self._settings
        steps: list[str] = []
        step = "connect"
        smtp: aiosmtplib.SMTP | None = None
        try:
            smtp = self._client(staged=True)
            async with asyncio.timeout(2 * settings.timeout):
                await smtp.connect()
                steps.append("TLS" if settings.security == "tls" else "connected")
                step = "EHLO"
                await smtp.ehlo()
                steps.append("EHLO")
                if settings.security == "starttls":
                    step = "STARTTLS"
                    await smtp.starttls()
                    steps.append("STARTTLS")
                if settings.username:
                    step = "login"
                    await smtp.login(settings.username, self._password or "")
                    steps.append(f"login as {settings.username}")
                with contextlib.suppress(SMTPException):
                    await smtp.quit()
        except (SMTPException, OSError, TimeoutError, SettingsError) as exc:
            reason = _describe(exc) if str(exc) else f"no answer within {2 * settings.timeout:g} s"
            secret = self._password
            return steps, f"{step}: {reason.replace(secret, '******') if secret else reason}"
        finally:
            if smtp is not None:
                smtp.close()
        return steps, None

    async def close(self) -> None:
        """Say QUIT (briefly) and close; the next `deliver()` would open a new connection."""
        session, self._session = self._session, None
        if session is None:
            return
        smtp = session.smtp
        if smtp.is_connected:
            try:
                async with asyncio.timeout(min(self._settings.timeout, _QUIT_TIMEOUT)):
                    await session.command(b"QUIT\r\n")
            except (SMTPException, OSError, TimeoutError):
                pass  # the server is gone or grumpy; closing our end is all that is left
        smtp.close()

    async def _deliver(self, envelope_from: str, rcpts: tuple[str, ...], data: bytes) -> Attempt:
        deadline = 2 * self._settings.timeout + len(data) / _MIN_BYTES_PER_SECOND
        try:
            # aiosmtplib's timeout is per socket read; this one bounds the whole attempt.
            async with asyncio.timeout(deadline):
                try:
                    session = await self._connection()
                except (SMTPException, OSError, SettingsError) as exc:
                    # Connect, TLS, EHLO or AUTH failed: a problem of the session, not of this
                    # message, so even a 5xx here (e.g. 535 bad credentials) is only deferred.
                    self._abandon()
                    reply = _describe(exc)
                    return _everyone(
                        rcpts, deferred=True, code=_code(exc), reply=reply, session=True
                    )
                attempt = await self._send(session, envelope_from, rcpts, data)
                return replace(attempt, session_failed=True) if attempt.code == 421 else attempt
        except (SMTPException, OSError) as exc:
            # Disconnect, read timeout or our own deadline in mid-transaction: the connection's
            # state is unknown, so it is dropped. The server may even have accepted the message.
            self._abandon()
            reply = _describe(exc) if str(exc) else f"TimeoutError: no answer within {deadline:g} s"
            return _everyone(rcpts, deferred=True, code=None, reply=reply)
        except asyncio.CancelledError:
            self._abandon()  # cancelled mid-dialogue: never reuse a half-finished transaction
            raise

    async def _connection(self) -> Session:
        """The open connection, or a new one if there is none, it dropped, or it is too old."""
        now = time.monotonic()
        if self._session is not None and not (
            self._session.smtp.is_connected
            and now - self._used_at < self._max_idle
            and now - self._opened_at < self._max_age
        ):
            await self.close()
        if self._session is None:
            self._session = Session(await self._connect())
            self._opened_at = self._used_at = time.monotonic()
        return self._session

    def _client(self, *, staged: bool = False) -> aiosmtplib.SMTP:
        """An unconnected client; `staged`: its `connect()` stops after the greeting (and the
        TLS handshake of `security: tls`), leaving STARTTLS and login to the caller."""
        settings = self._settings
        self._password = settings.password() if settings.username else None
        return aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            timeout=settings.timeout,
            use_tls=settings.security == "tls",
            # Explicit, never aiosmtplib's default None, which is opportunistic STARTTLS that a
            # stripped EHLO downgrades silently.
            start_tls=settings.security == "starttls" and not staged,
            # TLS means a verified certificate: the system's CAs, or smtp.ca_file.
            validate_certs=True,
            cert_bundle=str(settings.ca_file) if settings.ca_file else None,
            username=None if staged else settings.username,
            password=None if staged else self._password,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        settings = self._settings
        smtp = self._client()
        await smtp.connect()
        if smtp.is_ehlo_or_helo_needed:  # connect() says EHLO only for STARTTLS or a login
            try:
                await smtp.ehlo()
            except SMTPHeloError:
                await smtp.helo()
        log.debug("connected to %s:%d (%s)", settings.host, settings.port, settings.security)
        return smtp

    async def _send(
        self, session: Session, envelope_from: str, rcpts: tuple[str, ...], data: bytes
    ) -> Attempt:
        """One mail transaction on an open connection; failures with a reply are classified here,
        network failures propagate to `_deliver`."""
        smtp = session.smtp
        options = []
        if not all(a.isascii() for a in (envelope_from, *rcpts)):
            if not smtp.supports_extension("smtputf8"):
                # No retry can change that for this message.
                reply = "SMTPNotSupported: SMTPUTF8 is not supported by this server"
                return _everyone(rcpts, deferred=False, code=None, reply=reply)
            options.append("SMTPUTF8")
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        try:
            outcome = await session.transaction(envelope_from, rcpts, data, options)
        except ValueError as exc:  # an address that would put a control character on the wire
            return _everyone(rcpts, deferred=False, code=None, reply=_describe(exc))
        if outcome.closing:
            self._abandon()  # 421: the server is closing
        return _classified(rcpts, outcome)

    def _abandon(self) -> None:
        """Close without QUIT: after a failure the dialogue's state is not to be trusted."""
        session, self._session = self._session, None
        if session is not None:
            session.smtp.close()

    def _scrubbed(self, attempt: Attempt) -> Attempt:
        """The attempt with the password blanked out, in case a server or library echoed it."""
        secret = self._password
        if not secret:
            return attempt

        def scrub(text: str) -> str:
            return text.replace(secret, "******")

        return replace(
            attempt,
            deferred={r: scrub(t) for r, t in attempt.deferred.items()},
            refused={r: scrub(t) for r, t in attempt.refused.items()},
            reply=scrub(attempt.reply),
        )


async def check_relays(relays: Sequence[RelaySettings]) -> tuple[list[str], bool]:
    """`dispatcher check --relays`: one line per relay saying what worked and what did not,
    and whether any failed. The relays are checked together, each bounded by its timeout."""

    async def one(relay: RelaySettings) -> tuple[str, bool]:
        started = time.monotonic()
        async with SmtpConnection(relay) as connection:
            steps, failure = await connection.check()
        took = f"{time.monotonic() - started:.2f} s"
        done = ", ".join(steps) or "nothing"
        if failure is None:
            return f"ok    {relay.name}  {done} ({took})", False
        return f"FAIL  {relay.name}  {failure} (worked: {done}; {took})", True

    results = await asyncio.gather(*(one(relay) for relay in relays))
    return [line for line, _ in results], any(failed for _, failed in results)


def credential_warnings(settings: RelaySettings) -> list[str]:
    """What `dispatcher check` warns about: credentials that would cross a network in clear."""
    if settings.username is None or settings.security != "none" or is_loopback(settings.host):
        return []
    return [
        f"smtp: the username and password would be sent to {settings.host} without TLS"
        " (smtp.security: none); use starttls or tls"
    ]


def _classified(rcpts: tuple[str, ...], outcome: Outcome) -> Attempt:
    """Each recipient's outcome from the replies: MAIL's when it was refused, else its RCPT
    reply when that refused it, else the reply to DATA or to the message."""
    mail = outcome.mail
    if mail.code != 250:
        return _everyone(rcpts, deferred=mail.code // 100 != 5, code=mail.code, reply=str(mail))
    accepted = outcome.accepted
    final = outcome.data if accepted and outcome.data else list(outcome.rcpts.values())[-1]
    deferred: dict[str, str] = {}
    refused: dict[str, str] = {}
    delivered: list[str] = []
    for rcpt in rcpts:
        reply = final if rcpt in accepted else outcome.rcpts.get(rcpt, final)
        if reply.code == 250:
            delivered.append(rcpt)
        else:
            (refused if reply.code // 100 == 5 else deferred)[rcpt] = str(reply)
    return Attempt(tuple(delivered), deferred, refused, final.code, str(final))


def _everyone(
    rcpts: tuple[str, ...], *, deferred: bool, code: int | None, reply: str, session: bool = False
) -> Attempt:
    """The same outcome for every recipient."""
    reasons = dict.fromkeys(rcpts, reply)
    if deferred:
        return Attempt((), reasons, {}, code, reply, session)
    return Attempt((), {}, reasons, code, reply)


def _rewritten(address: str) -> bool:
    """Whether aiosmtplib would put another address on the wire than the one given.

    It routes every address through `email.utils.parseaddr`, which quietly picks the first
    plausible address of a string such as "a@x, b@y" or "a@x\\r\\nRCPT TO:<b@y>"; the outcome
    would then be reported for an address the message never went to. A plain dot-atom address
    comes through unchanged, which the pattern tells far faster than parseaddr.
    """
    if _PLAIN_ADDRESS.match(address):
        return False
    return email.utils.parseaddr(address)[1] != address


def _format(code: int, message: str) -> str:
    return f"{code} {message}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SMTPResponseException):
        return _format(exc.code, exc.message)
    return f"{type(exc).__name__}: {exc}"


def _code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, SMTPResponseException) else None
