"""The transaction `SmtpConnection` writes itself, against a scripted asyncio SMTP server on
127.0.0.1 that shows what went over the wire in each read and answers several commands in one
write, as Postfix does for a pipelined batch; and against aiosmtpd for the message's bytes."""

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from dispatcher.settings import SmtpSettings
from dispatcher.transport import Attempt, SmtpConnection
from tests.smtp_server import SmtpServer

SENDER = "noreply@example.com"
MESSAGE = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nplain\r\n.\r\nend\r\n"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def read_until(reader: asyncio.StreamReader, end: bytes, reads: list[bytes]) -> bytes:
    """Everything up to `end`, each socket read recorded as it came."""
    data = b""
    while not data.endswith(end):
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, f"client closed before {end!r}; got {data!r}"
        reads.append(chunk)
        data += chunk
    return data


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo: bytes) -> None:
    writer.write(b"220 scripted ESMTP\r\n")
    await read_until(reader, b"\r\n", [])
    writer.write(ehlo)


def deliver(script: Script, rcpts: tuple[str, ...], data: bytes = MESSAGE) -> list[Attempt]:
    """Deliver `data` twice over one connection to a server running `script` per connection."""

    async def run() -> list[Attempt]:
        reads: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer, reads)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, SmtpConnection(SmtpSettings(host="127.0.0.1", port=port)) as conn:
            return [await conn.deliver(SENDER, rcpts, data) for _ in range(2)]

    return asyncio.run(run())


def test_a_pipelined_batch_goes_in_one_write_and_replies_read_together_are_each_used() -> None:
    batches: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, reads: list[bytes]) -> None:
        await greet(r, w, b"250-scripted\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n")
        for n in range(2):
            start = len(reads)
            await read_until(r, b"DATA\r\n", reads)
            batches.append(b"".join(reads[start:]))
            assert len(reads) - start == 1, "MAIL, RCPT and DATA came in separate writes"
            w.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n")
            message = await read_until(r, b"\r\n.\r\n", reads)
            assert (
                message
                == b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nplain\r\n..\r\nend\r\n.\r\n"
            )
            w.write(f"250-2.0.0 queued\r\n250 as {n}\r\n".encode())
        await read_until(r, b"QUIT\r\n", reads)
        w.write(b"221 bye\r\n")

    first, second = deliver(script, ("ada@example.com", "nobody@example.com"))
    assert (
        batches[0]
        == (
            f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}\r\nRCPT TO:<ada@example.com>\r\n"
            "RCPT TO:<nobody@example.com>\r\nDATA\r\n"
        ).encode()
    )
    assert first.delivered == ("ada@example.com",) and second.delivered == ("ada@example.com",)
    assert first.refused == {"nobody@example.com": "550 5.1.1 no such user"}
    assert (first.code, first.reply, second.reply) == (
        250,
        "250 2.0.0 queued\nas 0",
        "250 2.0.0 queued\nas 1",
    )


def test_data_accepted_after_every_recipient_was_refused_is_ended_empty_and_reset() -> None:
    """RFC 2920 3.1: a server may take DATA when no RCPT succeeded; no message may follow."""
    seen: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, reads: list[bytes]) -> None:
        await greet(r, w, b"250-scripted\r\n250 PIPELINING\r\n")
        for _ in range(2):
            await read_until(r, b"DATA\r\n", reads)
            w.write(b"250 Ok\r\n450 4.2.0 mailbox busy\r\n354 go ahead\r\n")
            seen.append(await read_until(r, b".\r\n", reads))
            w.write(b"554 5.5.1 no valid recipients\r\n")
            seen.append(await read_until(r, b"RSET\r\n", reads))
            w.write(b"250 reset\r\n")

    attempts = deliver(script, ("ada@example.com",))
    assert seen[:2] == [b".\r\n", b"RSET\r\n"]
    for attempt in attempts:
        assert attempt.delivered == () and attempt.code == 450
        assert attempt.deferred == {"ada@example.com": "450 4.2.0 mailbox busy"}


def answering(reply: bytes, connections: list[int]) -> Script:
    """A server that answers each connection's pipelined batch with `reply`, then waits for
    the client to hang up; `connections` gets an entry per connection."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, reads: list[bytes]) -> None:
        connections.append(1)
        await greet(r, w, b"250-scripted\r\n250 PIPELINING\r\n")
        await read_until(r, b"DATA\r\n", reads)
        w.write(reply)
        await r.read()

    return script


def test_a_reply_that_is_not_smtp_is_deferred_and_the_connection_replaced() -> None:
    connections: list[int] = []
    attempts = deliver(answering(b"hello there\r\n", connections), ("ada@example.com",))
    for attempt in attempts:
        assert attempt.deferred == {"ada@example.com": attempt.reply}
        assert "Malformed SMTP response line: hello there" in attempt.reply
    assert len(connections) == 2


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_the_message_arrives_byte_for_byte_with_dots_and_bare_line_ends(pipelining: bool) -> None:
    data = b"Subject: dots\n\n.one\r\n.\rtwo\n"  # lone LF and CR, lines starting with a dot
    with SmtpServer(pipelining=pipelining) as server:
        settings = SmtpSettings(host="127.0.0.1", port=server.port)

        async def run() -> Attempt:
            async with SmtpConnection(settings) as conn:
                return await conn.deliver(SENDER, ["ada@example.com"], data)

        assert asyncio.run(run()).delivered == ("ada@example.com",)
        (received,) = server.wait_for(1)
    assert received.data == b"Subject: dots\r\n\r\n.one\r\n.\r\ntwo\r\n"


def test_a_refused_sender_sends_no_message_resets_and_an_unasked_reply_is_not_taken_for_one() -> (
    None
):
    seen: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, reads: list[bytes]) -> None:
        await greet(r, w, b"250-scripted\r\n250 PIPELINING\r\n")
        await read_until(r, b"DATA\r\n", reads)
        w.write(b"552 5.3.4 too big\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no valid recipients\r\n")
        seen.append(await read_until(r, b"RSET\r\n", reads))
        w.write(b"250 reset\r\n220 unasked chatter\r\n")  # a reply nobody asked for
        await read_until(r, b"DATA\r\n", reads)
        w.write(b"250 Ok\r\n250 Ok\r\n354 go ahead\r\n")
        await read_until(r, b"\r\n.\r\n", reads)
        w.write(b"250 queued\r\n")

    first, second = deliver(script, ("ada@example.com",))
    assert seen == [b"RSET\r\n"]  # no message data after the refused MAIL
    assert first.refused == {"ada@example.com": "552 5.3.4 too big"} and first.code == 552
    assert second.delivered == ("ada@example.com",) and second.reply == "250 queued"


@pytest.mark.parametrize("at", ["MAIL", "RCPT"])
def test_a_421_ends_the_transaction_there_as_a_failure_of_the_relay(at: str) -> None:
    """After a 421 the server sends nothing more: the replies it will never send are not
    waited for, and the attempt says the relay failed (no attempt of the message is used up)."""
    connections: list[int] = []
    reply = b"421 4.3.2 going down\r\n" if at == "MAIL" else b"250 Ok\r\n421 4.3.2 going down\r\n"
    for attempt in deliver(answering(reply, connections), ("ada@example.com", "bob@example.com")):
        assert attempt.session_failed and attempt.code == 421 and attempt.delivered == ()
        assert set(attempt.deferred) == {"ada@example.com", "bob@example.com"}
    assert len(connections) == 2
