"""How one delivery attempt decides a request's fate: sent, retried later, or dead."""

import pytest

from dispatcher.outcome import Dead, Retry, Sent, decide
from dispatcher.settings import RetrySettings
from dispatcher.spool import Row
from dispatcher.transport import Attempt

SETTINGS = RetrySettings(attempts=5, backoff=(30.0, 3600.0), max_age=86400.0)
CREATED = 1_000_000.0


def row(delivered: tuple[str, ...] = (), send_at: float | None = None) -> Row:
    return Row(
        id="r1",
        template="welcome",
        request=b"{}",
        created_at=CREATED,
        attempts=0,
        envelope_from="noreply@example.com",
        recipients=["a@x.org", "b@x.org"],
        delivered=list(delivered),
        refused={},
        message=b"...",
        message_id="<r1@x>",
        send_at=send_at,
    )


def attempt(
    delivered: tuple[str, ...] = (),
    deferred: dict[str, str] | None = None,
    refused: dict[str, str] | None = None,
    code: int | None = 250,
    reply: str = "250 ok",
) -> Attempt:
    return Attempt(delivered, deferred or {}, refused or {}, code, reply)


def test_2xx_for_everyone_is_sent() -> None:
    assert decide(attempt(("a@x.org", "b@x.org")), row(), 1, SETTINGS, CREATED) == Sent("250 ok")


def test_5xx_for_everyone_is_dead_with_the_reply() -> None:
    result = decide(
        attempt(
            refused={"a@x.org": "550 no", "b@x.org": "550 no"},
            code=550,
            reply="550 5.1.1 No such user",
        ),
        row(),
        1,
        SETTINGS,
        CREATED,
    )
    assert result == Dead("550 5.1.1 No such user")


def test_one_refused_one_delivered_is_sent() -> None:
    result = decide(
        attempt(("a@x.org",), refused={"b@x.org": "550 no"}), row(), 1, SETTINGS, CREATED
    )
    assert isinstance(result, Sent)


def test_4xx_is_retried_within_the_backoff_bounds() -> None:
    deferred = attempt(
        deferred={"a@x.org": "451 later", "b@x.org": "451 later"}, code=451, reply="451 4.3.0 later"
    )
    for number in (1, 2, 4):
        result = decide(deferred, row(), number, SETTINGS, CREATED + 10)
        assert isinstance(result, Retry) and result.reply == "451 4.3.0 later"
        assert CREATED + 10 + 30 <= result.at <= CREATED + 10 + 3600


def test_retry_delay_grows_with_the_attempt_number() -> None:
    deferred = attempt(deferred={"a@x.org": "451"}, code=451, reply="451")
    first = decide(deferred, row(), 1, SETTINGS, CREATED)
    fourth = decide(deferred, row(), 4, SETTINGS, CREATED)
    assert isinstance(first, Retry) and isinstance(fourth, Retry)
    assert fourth.at - CREATED >= 30 * 2**3 * 0.8 > first.at - CREATED


@pytest.mark.parametrize("earlier", [(), ("a@x.org",)])
def test_attempts_exhausted_is_dead(earlier: tuple[str, ...]) -> None:
    deferred = attempt(deferred={"b@x.org": "451 later"}, code=451, reply="451 later")
    result = decide(deferred, row(earlier), 5, SETTINGS, CREATED)
    assert result == Dead("gave up after 5 attempts: 451 later")


def test_too_old_is_dead_and_a_retry_never_lands_past_max_age() -> None:
    deferred = attempt(deferred={"a@x.org": "421 busy"}, code=421, reply="421 busy")
    assert decide(deferred, row(), 2, SETTINGS, CREATED + 86400) == Dead(
        "gave up after 86400 s in the queue: 421 busy"
    )
    nearly = decide(deferred, row(), 2, SETTINGS, CREATED + 86390)
    assert isinstance(nearly, Retry) and nearly.at == CREATED + 86400


def test_network_error_is_retried() -> None:
    result = decide(
        attempt(
            deferred={"a@x.org": "ConnectionRefusedError"},
            code=None,
            reply="SMTPConnectError: refused",
        ),
        row(),
        1,
        SETTINGS,
        CREATED,
    )
    assert isinstance(result, Retry)


def test_max_age_counts_from_send_at_for_a_scheduled_request() -> None:
    six_days = CREATED + 6 * 86400
    deferred = attempt(deferred={"a@x.org": "451 later"}, code=451, reply="451 later")
    result = decide(deferred, row(send_at=six_days), 1, SETTINGS, six_days + 60)
    assert isinstance(result, Retry) and result.at > six_days + 60


def test_a_retry_after_a_partial_delivery_gives_the_reply_that_deferred_it() -> None:
    partial = attempt(
        ("a@x.org",), deferred={"b@x.org": "452 4.2.2 Mailbox full"}, code=250, reply="250 ok"
    )
    result = decide(partial, row(), 1, SETTINGS, CREATED)
    assert isinstance(result, Retry) and result.reply == "452 4.2.2 Mailbox full"
