"""What goes into the spool and comes out of it, whatever store holds it."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from dispatcher.wire import PRIORITIES, Request, label, to_fields

STATES = ("queued", "retry", "sending", "sent", "dead")
EXCERPT_BYTES = 200  # of a rejected frame, kept for the operator


class Incoming(NamedTuple):
    """A request as intake stores it: its frame, and the columns the queue is ordered by.

    A named tuple, not a frozen dataclass: intake makes one per frame, and a tuple is made in
    a fraction of the time.
    """

    id: str
    template: str
    request: bytes  # the frame's JSON, checked at intake; fully validated when rendered
    priority: int = PRIORITIES["normal"]
    due: float | None = None  # `send_at` as a timestamp; None: at once
    idempotency_key: str | None = None
    client: str | None = None  # who gets the receipt; not stored

    @classmethod
    def from_fields(cls, fields: dict[str, Any], frame: bytes) -> "Incoming":
        """From a frame that passed the shape check and names its id."""
        send_at, priority = fields.get("send_at"), fields.get("priority")
        return cls(
            fields["id"],
            label(fields),  # a template's name, or `(message)`, `(raw)`
            frame,
            PRIORITIES["normal"] if priority is None else PRIORITIES[priority],
            None if send_at is None else datetime.fromisoformat(send_at).timestamp(),
            fields.get("idempotency_key"),
            fields.get("client"),
        )

    @classmethod
    def of(cls, request: Request) -> "Incoming":
        """A validated request in its wire form (for tools and tests)."""
        fields = to_fields(request)
        return cls.from_fields(fields, orjson.dumps(fields))


@dataclass(frozen=True, slots=True)
class Row:
    """A claimed request as the delivery side needs it."""

    id: str
    template: str
    request: bytes
    created_at: float
    attempts: int
    envelope_from: str | None
    recipients: list[str] | None  # still to deliver; None until rendered
    delivered: list[str]
    refused: dict[str, str]
    message: bytes | None  # rendered once, on the first attempt; every retry sends these bytes
    message_id: str | None
    priority: int = PRIORITIES["normal"]
    due: float = 0.0  # when it was to go: `send_at`, a retry's time, or its arrival
    send_at: float | None = None  # as the request asked; `retry.max_age` counts from here


@dataclass(frozen=True, slots=True)
class Start:
    """Attempt `number` of a rendered request begins at `at`."""

    row: Row
    number: int
    at: float


@dataclass(frozen=True, slots=True)
class Finish:
    """How an attempt (or a render) ended: the request's new state and what to keep of it.

    Recording it also ends the daemon's claim on the request.
    """

    request_id: str
    state: str
    at: float
    reply: str
    next_attempt_at: float | None = None
    code: int | None = None
    number: int | None = None  # the attempt, None when nothing was sent (a render failure)
    recipients: Sequence[str] | None = None  # still to deliver; None keeps the stored list
    delivered: Sequence[str] = ()
    refused: dict[str, str] | None = None
    maybe_duplicate: bool = False  # the send was cut short: the server may have the message

    def __post_init__(self) -> None:
        assert self.state in STATES


@dataclass(frozen=True, slots=True)
class RelayState:
    """A relay as a daemon last saw it, for `dispatcher status`."""

    relay: str  # host:port
    up: bool
    since: float  # when it went down or came up
    reason: str  # why it is down; empty while up
