"""What goes into the spool and comes out of it, whatever store holds it."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from dispatcher.errors import UsageError
from dispatcher.spool.sql import ATTEMPT_COLUMNS
from dispatcher.wire import PRIORITIES, Request, label, to_fields

STATES = ("queued", "retry", "sending", "sent", "dead")
EXCERPT_BYTES = 200  # of a rejected frame, kept for the operator
FAILURE_KEYS = ("at", "state", "id", "template", "reason")
PURGE_BATCH = 5000  # requests deleted per transaction
DAEMON_KEYS = ("owner", "started_at", "last_heartbeat")
RELAY_KEYS = ("daemon", "relay", "state", "since", "reason", "updated_at")


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


def relay_states(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """`Reader.relays` from rows of RELAY_COLUMNS, whatever store they came from."""
    return [
        dict(zip(RELAY_KEYS, (owner, relay, "up" if up else "down", *rest), strict=True))
        for owner, relay, up, *rest in rows
    ]


def row_of(r: Sequence[Any]) -> Row:
    """A `Row` from the columns of ROW_COLUMNS: JSON lists and maps are stored as text."""
    return Row(
        id=r[0],
        template=r[1],
        request=bytes(r[2]),
        created_at=r[3],
        attempts=r[4],
        envelope_from=r[5],
        recipients=None if r[6] is None else orjson.loads(r[6]),
        delivered=orjson.loads(r[7]),
        refused=orjson.loads(r[8]),
        message=None if r[9] is None else bytes(r[9]),
        message_id=r[10],
        priority=r[11],
        due=r[12],
        send_at=r[13],
    )


def inspected(found: dict[str, Any], attempts: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """`Reader.inspect`'s answer from the INSPECTED_COLUMNS of a request and its attempts'
    ATTEMPT_COLUMNS, whatever store they came from."""
    report = dict(found)
    for key in ("recipients", "delivered", "refused", "request"):
        if report[key] is not None:
            report[key] = orjson.loads(report[key])
    if report["message"] is not None:
        report["message"] = bytes(report["message"])
    report["maybe_duplicate"] = bool(report["maybe_duplicate"])
    report["attempt_log"] = [dict(zip(ATTEMPT_COLUMNS, a, strict=True)) for a in attempts]
    return report


def newest_failures(
    dead: Sequence[Sequence[Any]], rejected: Sequence[Sequence[Any]], limit: int
) -> list[dict[str, Any]]:
    """`Reader.recent_failures` from the newest dead and rejected rows (FAILURE_KEYS each)."""
    newest = sorted([*map(tuple, dead), *map(tuple, rejected)], reverse=True)[:limit]
    return [dict(zip(FAILURE_KEYS, row, strict=True)) for row in newest]


def purge_in_batches(
    state: str,
    older_than: float | None,
    now: float,
    limit: int | None,
    delete: Callable[[str, float, int], int],
) -> int:
    """`Spool.purge` for any store: `delete(state, cutoff, n)` deletes, in one transaction, up
    to n requests in `state` last updated at `cutoff` or before and says how many; it is
    called until fewer are left or `limit` are gone."""
    if state not in ("sent", "dead"):
        raise UsageError(f"only sent or dead requests can be purged, not {state!r}")
    cutoff = float("inf") if older_than is None else now - older_than
    purged = 0
    while True:
        batch = PURGE_BATCH if limit is None else min(PURGE_BATCH, limit - purged)
        deleted = delete(state, cutoff, batch)
        purged += deleted
        if deleted < batch or purged == limit:
            return purged
