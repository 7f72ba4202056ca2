"""SmtpConnection against a real aiosmtpd server: one reused connection, every failure a value.

Each test drives the transport with `asyncio.run()` and injects faults into the `smtp_server`
fixture; 2xx must come back delivered, 4xx and network trouble deferred, 5xx refused, per
recipient, and `deliver()` must never raise for any of them.
"""

import asyncio
import email.utils
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from email.utils import make_msgid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.settings import SmtpSettings
from dispatcher.transport import _PLAIN_ADDRESS, Attempt, SmtpConnection
from tests.smtp_server import SmtpServer, free_port

SENDER = "noreply@example.com"
ADA = "ada@example.com"
BOB = "bob@example.com"


@pytest.fixture(params=[True, False], ids=["pipelining", "lockstep"])
def smtp_server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """Every test here runs against a server that offers PIPELINING and one that does not."""
    with SmtpServer(pipelining=request.param) as server:
        yield server


def settings_for(port: int, **overrides: object) -> SmtpSettings:
    return SmtpSettings(host="127.0.0.1", port=port, **overrides)  # type: ignore[arg-type]


def message(subject: str = "Hello", to: Sequence[str] = (ADA,)) -> bytes:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content("Hi there.\n")
    return msg.as_bytes()


def deliver_all(
    settings: SmtpSettings, *sends: tuple[Sequence[str], bytes], **options: float
) -> list[Attempt]:
    """Deliver each (recipients, data) in order over one SmtpConnection."""

    async def run() -> list[Attempt]:
        async with SmtpConnection(settings, **options) as conn:
            return [await conn.deliver(SENDER, rcpts, data) for rcpts, data in sends]

    return asyncio.run(run())


def deliver_one(settings: SmtpSettings, rcpts: Sequence[str] = (ADA,)) -> Attempt:
    return deliver_all(settings, (rcpts, message(to=rcpts)))[0]


# -- success and connection reuse -------------------------------------------------------------


def test_250_delivers_to_every_recipient(smtp_server: SmtpServer) -> None:
    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.delivered == (ADA, BOB)
    assert (attempt.deferred, attempt.refused) == ({}, {})
    assert attempt.code == 250
    assert attempt.reply.startswith("250 2.0.0 Ok queued")
    [received] = smtp_server.wait_for(1)
    assert received.envelope_from == SENDER
    assert received.rcpt_tos == (ADA, BOB)
    assert received.message["Subject"] == "Hello"


def test_one_connection_carries_twenty_messages(smtp_server: SmtpServer) -> None:
    sends = [([ADA], message(f"n{i}")) for i in range(20)]

    attempts = deliver_all(settings_for(smtp_server.port), *sends)

    assert all(a.delivered == (ADA,) for a in attempts)
    assert len(smtp_server.wait_for(20)) == 20
    assert smtp_server.connections_opened == 1


def test_reconnects_after_the_server_dropped_the_connection(smtp_server: SmtpServer) -> None:
    smtp_server.drop_connection(times=1)

    dropped, after = deliver_all(
        settings_for(smtp_server.port), ([ADA], message()), ([ADA], message())
    )

    assert dropped.deferred[ADA].startswith("SMTPServerDisconnected: ")
    assert dropped.code is None
    assert after.delivered == (ADA,)
    assert smtp_server.connections_opened == 2


def test_connection_idle_longer_than_max_idle_is_replaced(smtp_server: SmtpServer) -> None:
    sends = [([ADA], message()), ([ADA], message())]

    attempts = deliver_all(settings_for(smtp_server.port), *sends, max_idle=0.0)

    assert [a.delivered for a in attempts] == [(ADA,), (ADA,)]
    assert smtp_server.connections_opened == 2


# -- temporary failures: deferred -------------------------------------------------------------


def test_451_on_data_is_deferred_with_the_reply(smtp_server: SmtpServer) -> None:
    smtp_server.fail_data(times=1, reply="451 4.3.0 Try again later")

    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.deferred == {ADA: "451 4.3.0 Try again later", BOB: "451 4.3.0 Try again later"}
    assert (attempt.delivered, attempt.refused) == ((), {})
    assert attempt.code == 451
    assert attempt.reply == "451 4.3.0 Try again later"


def test_451_twice_per_message_then_accepted_on_the_same_connection(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.fail_data_per_message(times=2)
    first, second = message("first"), message("second")

    attempts = deliver_all(
        settings_for(smtp_server.port), *[([ADA], data) for data in (first, second) * 3]
    )

    assert [a.code for a in attempts] == [451, 451, 451, 451, 250, 250]
    assert {m.message["Subject"] for m in smtp_server.wait_for(2)} == {"first", "second"}
    assert smtp_server.connections_opened == 1  # a 4xx on DATA leaves the session usable


def test_450_greylisting_defers_that_recipient_only(smtp_server: SmtpServer) -> None:
    smtp_server.refuse_recipient(BOB, "450 4.2.0 Greylisted")

    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.delivered == (ADA,)
    assert attempt.deferred == {BOB: "450 4.2.0 Greylisted"}
    assert attempt.refused == {}


def test_421_is_deferred_and_the_next_message_opens_a_new_connection(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.fail_data(times=1, reply="421 4.3.2 System shutting down")

    closing, after = deliver_all(
        settings_for(smtp_server.port), ([ADA], message()), ([ADA], message())
    )

    assert closing.deferred == {ADA: "421 4.3.2 System shutting down"}
    assert closing.code == 421
    assert after.delivered == (ADA,)
    assert smtp_server.connections_opened == 2


def test_nothing_listening_is_deferred_not_raised() -> None:
    attempt = deliver_one(settings_for(free_port(), timeout=2.0), [ADA, BOB])

    assert set(attempt.deferred) == {ADA, BOB}
    assert attempt.reply.startswith("SMTPConnectError: ")
    assert attempt.code is None
    assert attempt.delivered == ()


def test_server_down_then_up_on_the_same_port_delivers() -> None:
    server = SmtpServer(port=free_port())
    settings = settings_for(server.port, timeout=2.0)

    async def run() -> tuple[Attempt, Attempt]:
        async with SmtpConnection(settings) as conn:
            down = await conn.deliver(SENDER, [ADA], message())
            await asyncio.to_thread(server.start)
            return down, await conn.deliver(SENDER, [ADA], message())

    try:
        down, up = asyncio.run(run())
    finally:
        server.stop()

    assert ADA in down.deferred
    assert up.delivered == (ADA,)


def test_reply_slower_than_the_attempts_deadline_is_deferred(smtp_server: SmtpServer) -> None:
    """An attempt may take 2 x timeout (plus time for the bytes); a reply later than that
    defers it. Replies have no timeout of their own once connected."""
    smtp_server.slow_reply(seconds=5.0, times=1)

    slow, after = deliver_all(
        settings_for(smtp_server.port, timeout=0.5), ([ADA], message()), ([ADA], message())
    )

    assert slow.deferred[ADA].startswith("TimeoutError: no answer within 1.0")
    assert slow.code is None
    assert after.delivered == (ADA,)  # on a fresh connection: the timed-out one was dropped
    assert smtp_server.connections_opened == 2


# -- permanent failures: refused --------------------------------------------------------------


def test_550_for_one_recipient_delivers_to_the_other(smtp_server: SmtpServer) -> None:
    smtp_server.refuse_recipient(BOB)

    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.delivered == (ADA,)
    assert attempt.refused == {BOB: "550 5.1.1 No such user"}
    assert attempt.deferred == {}
    assert [m.rcpt_tos for m in smtp_server.wait_for(1)] == [(ADA,)]


def test_all_recipients_refused_are_refused_each_with_its_reply(smtp_server: SmtpServer) -> None:
    smtp_server.refuse_recipient(ADA)
    smtp_server.refuse_recipient(BOB, "550 5.7.1 Relaying denied")

    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.refused == {ADA: "550 5.1.1 No such user", BOB: "550 5.7.1 Relaying denied"}
    assert (attempt.delivered, attempt.deferred) == ((), {})
    assert attempt.code == 550
    assert smtp_server.messages == []


def test_after_every_recipient_is_refused_the_connection_carries_the_next_message(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.refuse_recipient(ADA)

    refused, after = deliver_all(
        settings_for(smtp_server.port), ([ADA], message()), ([BOB], message(to=[BOB]))
    )

    assert set(refused.refused) == {ADA}
    assert after.delivered == (BOB,)  # the envelope was reset: no "503 nested MAIL"
    assert smtp_server.connections_opened == 1


def test_mixed_refusals_split_into_refused_and_deferred(smtp_server: SmtpServer) -> None:
    smtp_server.refuse_recipient(ADA)
    smtp_server.refuse_recipient(BOB, "450 4.2.0 Greylisted")

    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.refused == {ADA: "550 5.1.1 No such user"}
    assert attempt.deferred == {BOB: "450 4.2.0 Greylisted"}


def test_554_on_data_is_refused_for_everyone(smtp_server: SmtpServer) -> None:
    smtp_server.fail_data(times=1, reply="554 5.7.1 Message rejected as spam")

    attempt = deliver_one(settings_for(smtp_server.port), [ADA, BOB])

    assert attempt.refused == dict.fromkeys([ADA, BOB], "554 5.7.1 Message rejected as spam")
    assert attempt.code == 554


def test_address_that_is_not_a_plain_envelope_address_is_refused_alone(
    smtp_server: SmtpServer,
) -> None:
    injected = "bob@example.com\r\nRCPT TO:<eve@example.com>"

    [attempt] = deliver_all(settings_for(smtp_server.port), ([ADA, injected], message()))

    assert attempt.delivered == (ADA,)
    assert attempt.refused[injected].startswith("ValueError: not a plain envelope address")
    assert [m.rcpt_tos for m in smtp_server.wait_for(1)] == [(ADA,)]


def test_sender_that_is_not_a_plain_address_refuses_everyone_without_connecting(
    smtp_server: SmtpServer,
) -> None:
    async def run() -> Attempt:
        async with SmtpConnection(settings_for(smtp_server.port)) as conn:
            return await conn.deliver("a@example.com, b@example.com", [ADA], message())

    attempt = asyncio.run(run())

    assert set(attempt.refused) == {ADA}
    assert smtp_server.connections_opened == 0


def test_internationalised_address_is_sent_with_smtputf8(smtp_server: SmtpServer) -> None:
    attempt = deliver_one(settings_for(smtp_server.port), ["jörg@exämple.com"])

    assert attempt.delivered == ("jörg@exämple.com",)
    assert smtp_server.wait_for(1)[0].rcpt_tos == ("jörg@exämple.com",)


# -- the session itself failing ---------------------------------------------------------------


def test_starttls_required_but_not_offered_is_deferred_never_sent_in_clear(
    smtp_server: SmtpServer,
) -> None:
    attempt = deliver_one(settings_for(smtp_server.port, security="starttls"))

    assert ADA in attempt.deferred
    assert "STARTTLS" in attempt.reply
    assert smtp_server.messages == []


def test_login_failure_is_deferred_and_never_shows_the_password(
    smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHER_SMTP_PASSWORD", "hunter2-secret")

    attempt = deliver_one(settings_for(smtp_server.port, username="mailer"))

    assert ADA in attempt.deferred  # the test server offers no AUTH over plain text
    assert "hunter2-secret" not in repr(attempt)
    assert smtp_server.messages == []


# -- the test server itself -------------------------------------------------------------------


def test_wait_for_says_how_many_arrived_when_it_gives_up(smtp_server: SmtpServer) -> None:
    with pytest.raises(AssertionError, match=r"expected 1 message\(s\) within 0.05 s, 0 arrived"):
        smtp_server.wait_for(1, timeout=0.05)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.from_regex(_PLAIN_ADDRESS, fullmatch=True))
def test_the_plain_address_shortcut_agrees_with_parseaddr(address: str) -> None:
    """Whatever the fast pattern calls plain, parseaddr returns unchanged."""
    assert email.utils.parseaddr(address)[1] == address
