"""One SMTP mail transaction written straight to a connection that aiosmtplib opened.

aiosmtplib opens the session (connect, TLS, EHLO, STARTTLS, AUTH); the transactions on it then
go through `Session`, which takes over the connection's transport. aiosmtplib's own `sendmail()`
waits for each reply before it sends the next command, parses every address again and re-scans
every message (line endings twice, leading dots). Here, when the server offers PIPELINING
(RFC 2920), MAIL, every RCPT and DATA go in one write, and the message, already in CRLF form
from our MIME writer, is only dot-stuffed; without PIPELINING each command waits for its reply.

What it costs in code: this module, a reply reader and the order of a transaction.
"""

import asyncio
import re
from collections import deque
from dataclasses import dataclass
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponseException, SMTPServerDisconnected

MAX_LINE = 8192  # bytes in one reply line, as aiosmtplib allows
MAX_BUFFER = 4 * MAX_LINE  # bytes of replies not yet read: a server streaming junk is cut off
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never on a command line: CR/LF would inject


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the lines after the code, joined by newlines

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The replies of one transaction, per step."""

    mail: Reply
    rcpts: dict[str, Reply]  # the RCPT replies read (none after a refused MAIL or a 421)
    data: Reply | None  # the reply to DATA when it was refused, else to the message; None: not sent

    @property
    def accepted(self) -> list[str]:
        return [r for r, reply in self.rcpts.items() if reply.code in (250, 251)]

    @property
    def closing(self) -> bool:
        """Whether the server said 421: it is closing the connection."""
        replies = (self.mail, *self.rcpts.values(), *([self.data] if self.data else []))
        return any(reply.code == 421 for reply in replies)


class Session(asyncio.Protocol):
    """The transactions on a connection `smtp` opened (it keeps closing it); reads the
    server's replies, however many arrive in one read."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.transport = cast(asyncio.Transport, smtp.transport)
        self.pipelining = smtp.supports_extension("pipelining")
        self._buffer = bytearray()
        self._replies: deque[Reply] = deque()
        self._failure: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (reply := self._parse()) is not None:
                self._replies.append(reply)
            if len(self._buffer) > MAX_BUFFER:
                raise SMTPResponseException(-1, "Response too long")
        except SMTPResponseException as exc:
            self._fail(exc)
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        failure = SMTPServerDisconnected("Connection lost")
        failure.__cause__ = exc
        self._fail(failure)

    async def transaction(
        self, envelope_from: str, rcpts: tuple[str, ...], data: bytes, options: list[str]
    ) -> Outcome:
        """MAIL, RCPT for each recipient, DATA and the message; stops early when nothing can be
        delivered. Network failures and unreadable replies raise, as aiosmtplib's would."""
        mail = _command("MAIL FROM:", envelope_from, options)
        commands = [_command("RCPT TO:", rcpt, []) for rcpt in rcpts]
        self._replies.clear()  # said between transactions, unasked: never a reply to ours
        mail_reply, replies, start = await self._exchange(mail, rcpts, commands)
        outcome = Outcome(mail_reply, replies, start)
        if start is not None and start.code == 354:
            if mail_reply.code == 250 and outcome.accepted:
                self.write(_dot_stuffed(data))
                return Outcome(mail_reply, replies, await self.read())
            self.write(b".\r\n")  # DATA accepted with no recipient (RFC 2920 3.1): end it empty
            await self.read()
        if not outcome.closing:
            await self.command(b"RSET\r\n")  # clear the envelope the failure left behind
        return outcome

    async def _exchange(
        self, mail: bytes, rcpts: tuple[str, ...], commands: list[bytes]
    ) -> tuple[Reply, dict[str, Reply], Reply | None]:
        """MAIL, each RCPT and DATA with their replies: written at once when the server
        pipelines, else each after the reply to the one before, which stops where nothing more
        can be delivered. A 421 ends it: the server closes the connection, nothing more comes."""
        if self.pipelining:
            self.write(b"".join((mail, *commands, b"DATA\r\n")))

        async def step(line: bytes) -> Reply:
            return await (self.read() if self.pipelining else self.command(line))

        mail_reply = await step(mail)
        replies: dict[str, Reply] = {}
        if mail_reply.code == 421 or (mail_reply.code != 250 and not self.pipelining):
            return mail_reply, replies, None
        for rcpt, command in zip(rcpts, commands, strict=True):
            replies[rcpt] = reply = await step(command)
            if reply.code == 421:
                return mail_reply, replies, None
        if not self.pipelining and not any(r.code in (250, 251) for r in replies.values()):
            return mail_reply, replies, None
        return mail_reply, replies, await step(b"DATA\r\n")

    async def command(self, line: bytes) -> Reply:
        self.write(line)
        return await self.read()

    async def read(self) -> Reply:
        """The next reply; the caller bounds the wait (the attempt's deadline)."""
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def write(self, data: bytes) -> None:
        if self._failure is not None or self.transport.is_closing():
            raise self._failure or SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    def _parse(self) -> Reply | None:
        """One whole reply off the front of the buffer, or None while it is incomplete."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            if len(line) > MAX_LINE:
                raise SMTPResponseException(-1, "Response too long")
            if not line[:3].isdigit():
                shown = line.decode("utf-8", "replace").strip()
                raise SMTPResponseException(-1, f"Malformed SMTP response line: {shown}")
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return Reply(int(line[:3]), text)
        return None

    def _fail(self, exc: Exception) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _command(verb: str, address: str, options: list[str]) -> bytes:
    line = " ".join([f"{verb}<{address}>", *options]).encode("utf-8")
    if _CONTROL.search(line):
        raise ValueError(f"a control character in {address!r} or its options")
    return line + b"\r\n"


def _dot_stuffed(data: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, leading dots doubled, the final dot.

    Our messages are in CRLF form already; anything else (a lone CR or LF) is normalised.
    """
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
