"""What an attempt means for its request: sent, retried later, or dead, decided in one place."""

import logging
from dataclasses import dataclass
from typing import ClassVar

from dispatcher.backoff import retry_delay
from dispatcher.settings import RetrySettings
from dispatcher.spool import Finish, Row
from dispatcher.transport import Attempt


@dataclass(frozen=True, slots=True)
class Sent:
    """Every recipient that can be reached has the message."""

    reply: str
    state: ClassVar[str] = "sent"


@dataclass(frozen=True, slots=True)
class Retry:
    """Some recipients were deferred (or we could not try); try again at `at`."""

    reply: str
    at: float
    state: ClassVar[str] = "retry"


@dataclass(frozen=True, slots=True)
class Dead:
    """The request will never be delivered (further); `reply` says why."""

    reply: str
    state: ClassVar[str] = "dead"


Outcome = Sent | Retry | Dead
LOG_LEVELS = {"sent": logging.INFO, "retry": logging.WARNING, "dead": logging.ERROR}


def describe(outcome: Outcome, at: float) -> str:
    """The end of the outcome's log line."""
    match outcome:
        case Retry(reply, when):
            return f"in {when - at:.1f}s: {reply}"
        case Sent(reply):
            return f"reply={reply!r}"
        case Dead(reply):
            return f"reason={reply!r}"


def decide(attempt: Attempt, row: Row, number: int, retry: RetrySettings, at: float) -> Outcome:
    """The one place where an attempt's result becomes the request's fate.

    `retry.max_age` counts from when the request was to go first: a mail scheduled days ahead
    gets its whole age from its `send_at`, not from when it was accepted.
    """
    if not attempt.deferred:
        return Sent(attempt.reply) if attempt.delivered or row.delivered else Dead(attempt.reply)
    # After a partial delivery the final reply is a 250: what deferred the rest says more.
    reply = attempt.reply if attempt.code is None or attempt.code >= 400 else deferral(attempt)
    expires = expiry(row, retry)
    if number >= retry.attempts:
        return Dead(f"gave up after {number} attempts: {reply}")
    if at >= expires:
        return Dead(f"gave up after {retry.max_age:g} s in the queue: {reply}")
    return Retry(reply, min(at + retry_delay(number, *retry.backoff), expires))


def expiry(row: Row, retry: RetrySettings) -> float:
    """When `retry.max_age` runs out for the request."""
    return max(row.created_at, row.send_at or 0.0) + retry.max_age


def expired(row: Row, retry: RetrySettings, at: float) -> bool:
    """Whether the request has waited longer than `retry.max_age` (so is never sent)."""
    return at >= expiry(row, retry)


def deferral(attempt: Attempt) -> str:
    """The reply that deferred the first deferred recipient."""
    return next(iter(attempt.deferred.values()))


def finish(row: Row, outcome: Outcome, at: float, attempt: Attempt | None = None) -> Finish:
    """The spool record of an outcome; without an attempt, nothing was sent (a render)."""
    retry_at = outcome.at if isinstance(outcome, Retry) else None
    if attempt is None:
        return Finish(row.id, outcome.state, at, outcome.reply, next_attempt_at=retry_at)
    return Finish(
        row.id,
        outcome.state,
        at,
        outcome.reply,
        next_attempt_at=retry_at,
        code=attempt.code,
        number=row.attempts + 1,
        recipients=list(attempt.deferred),
        delivered=[*row.delivered, *attempt.delivered],
        refused={**row.refused, **attempt.refused},
    )
