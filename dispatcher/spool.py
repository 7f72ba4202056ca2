"""The SQLite spool: the source of truth for every request the daemon has accepted.

A request is acknowledged only once the transaction holding it has committed, so the pragmas
below are chosen for that promise, not for speed; speed comes from committing whole batches.
"""

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from dispatcher.errors import StartupError
from dispatcher.permissions import private_dir, private_file
from dispatcher.wire import PRIORITIES, Request, to_fields

STATES = ("queued", "retry", "sending", "sent", "dead")
WAITING = "state in ('queued', 'retry', 'sending')"  # not yet sent or dead
EXCERPT_BYTES = 200
PURGE_BATCH = 5000  # requests deleted per transaction

SCHEMA = """
create table if not exists requests (
    id text primary key,
    idempotency_key text unique,
    template text not null,
    request blob not null,              -- the wire-form JSON, as validated at intake
    state text not null,
    priority integer not null,
    created_at real not null,
    next_attempt_at real not null,
    attempts integer not null default 0,
    recipients text,                    -- JSON list still to deliver; null until rendered
    delivered text not null default '[]',
    refused text not null default '{}', -- JSON {recipient: reply} of permanent refusals
    last_reply text,
    maybe_duplicate integer not null default 0,
    updated_at real not null
);
create index if not exists requests_due on requests (state, priority, next_attempt_at);
-- Rendered once, written once; every retry sends these bytes. Kept apart from `requests` so
-- the frequent state updates there do not rewrite a message-sized row each time.
create table if not exists messages (
    request_id text primary key references requests (id) on delete cascade,
    message_id text not null,
    envelope_from text not null,
    data blob not null
);
create table if not exists attempts (
    request_id text not null references requests (id) on delete cascade,
    number integer not null,
    started_at real not null,
    finished_at real,
    outcome text,
    code integer,
    reply text,
    primary key (request_id, number)
);
create table if not exists rejected (
    id integer primary key,
    received_at real not null,
    reason text not null,
    excerpt blob not null               -- the first bytes of the frame, for the operator
);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """A request as the delivery side needs it."""

    id: str
    template: str
    request: bytes
    created_at: float
    attempts: int
    envelope_from: str | None
    recipients: list[str] | None
    delivered: list[str]
    refused: dict[str, str]
    message: bytes | None
    message_id: str | None


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as intake stores it: its frame, and the columns the queue is ordered by."""

    id: str
    template: str
    request: bytes  # the frame's JSON, checked at intake; fully validated when rendered
    priority: int = PRIORITIES["normal"]
    due: float | None = None  # `send_at` as a timestamp; None: at once
    idempotency_key: str | None = None
    client: str | None = None  # who gets the receipt; not stored

    @classmethod
    def from_fields(cls, fields: dict[str, Any], frame: bytes) -> "Incoming":
        """From a frame that passed `wire.check` and names its id."""
        send_at = fields.get("send_at")
        return cls(
            id=fields["id"],
            template=fields["template"],
            request=frame,
            priority=PRIORITIES[fields.get("priority") or "normal"],
            due=datetime.fromisoformat(send_at).timestamp() if send_at else None,
            idempotency_key=fields.get("idempotency_key"),
            client=fields.get("client"),
        )

    @classmethod
    def of(cls, request: Request) -> "Incoming":
        """A validated request in its wire form (for tools and tests)."""
        fields = to_fields(request)
        return cls.from_fields(fields, orjson.dumps(fields))


@dataclass(frozen=True, slots=True)
class Start:
    """Attempt `number` of a rendered request begins at `at`."""

    row: Row
    number: int
    at: float


@dataclass(frozen=True, slots=True)
class Finish:
    """How an attempt (or a render) ended: the request's new state and what to keep of it."""

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

    def __post_init__(self) -> None:
        assert self.state in STATES


class Spool:
    """One connection to the spool file; used from one thread (the daemon's event loop)."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        try:
            # Owner-only: the spool holds every message; its -wal and -shm files get its mode.
            private_file(private_dir(path.parent) / path.name)
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction
            # takes the write lock up front instead of failing half-way with SQLITE_BUSY.
            self.db = sqlite3.connect(path, isolation_level=None, timeout=timeout)
            self.db.execute("pragma journal_mode=wal")  # readers never block the writer
            # FULL: a committed batch survives power loss, which is what accepting promises.
            self.db.execute("pragma synchronous=full")
            self.durable = True
            self.db.execute("pragma foreign_keys=on")
            # One transaction, so two processes creating a new spool cannot interleave.
            self.db.executescript(f"begin immediate; {SCHEMA} commit;")
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"spool.path: cannot open {path}: {exc}") from None

    @classmethod
    def reader(cls, path: Path, *, timeout: float = 5.0) -> "Spool":
        """A read-only view for the reporting methods, from any thread (a metrics scrape runs
        on the HTTP server's thread): no schema, no pragmas, never a write."""
        spool = cls.__new__(cls)
        try:
            spool.db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=timeout,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StartupError(f"spool.path: cannot open {path}: {exc}") from None
        spool.durable = True
        return spool

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception.

        `durable=False` skips the fsync (synchronous=NORMAL): still safe against a crash of
        the process, and a power loss can only undo delivery bookkeeping, which at worst
        sends a message again. Accepting a request is always durable.
        """
        if durable != self.durable:
            self.db.execute(f"pragma synchronous={'full' if durable else 'normal'}")
            self.durable = durable
        self.db.execute("begin immediate")
        try:
            yield self.db
        except BaseException:
            self.db.execute("rollback")
            raise
        self.db.execute("commit")

    # -- intake ------------------------------------------------------------------------

    def add(
        self,
        requests: Sequence[Incoming],
        rejections: Sequence[tuple[str, bytes]],
        now: float,
    ) -> list[str]:
        """Store a batch in one transaction; returns the ids that were new.

        An id (or idempotency key) already held is ignored, so a re-sent request is stored once.
        """
        rows = [
            (
                r.id,
                r.idempotency_key,
                r.template,
                r.request,
                r.priority,
                now,
                now if r.due is None else r.due,
                now,
            )
            for r in requests
        ]
        with self.transaction() as db:
            before = db.total_changes
            db.executemany(
                "insert or ignore into requests (id, idempotency_key, template, request, state,"
                " priority, created_at, next_attempt_at, updated_at)"
                " values (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                rows,
            )
            if db.total_changes - before == len(rows):  # the usual case: all of them new
                added = [row[0] for row in rows]
            else:  # some were held already (a re-send, an idempotency key): which are ours?
                added = self._added_at(db, [row[0] for row in rows], now)
            db.executemany(
                "insert into rejected (received_at, reason, excerpt) values (?, ?, ?)",
                [(now, reason, frame[:EXCERPT_BYTES]) for reason, frame in rejections],
            )
        return added

    @staticmethod
    def _added_at(db: sqlite3.Connection, ids: list[str], now: float) -> list[str]:
        """Those of `ids` this transaction inserted: created at exactly `now`, each once."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            found.update(
                request_id
                for (request_id,) in db.execute(
                    f"select id from requests where created_at = ? and id in"
                    f" ({', '.join('?' * len(chunk))})",
                    (now, *chunk),
                )
            )
        return [request_id for request_id in dict.fromkeys(ids) if request_id in found]

    def requeue_interrupted(self, now: float, request_id: str | None = None) -> int:
        """Sends cut short (by a crash, or one request at shutdown) go again, flagged as
        possible duplicates: the server may already have the message."""
        with self.transaction() as db:
            cursor = db.execute(
                "update requests set state = 'retry', maybe_duplicate = 1, next_attempt_at = ?,"
                " updated_at = ? where state = 'sending' and (? is null or id = ?)",
                (now, now, request_id, request_id),
            )
        return cursor.rowcount

    # -- delivery ----------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: set[str]) -> list[Row]:
        """Waiting requests whose time has come, most urgent first, minus those in hand.

        One query per waiting state: with `state in (...)` SQLite sorts every waiting row in a
        temporary B-tree on each call, which made a deep queue cost O(n) per message. Per state
        it walks the `requests_due` index in order and stops at the limit.
        """
        rows = [
            row
            for state in ("queued", "retry")
            for row in self.db.execute(
                "select id, template, request, created_at, attempts, envelope_from, recipients,"
                " delivered, refused, data, message_id, priority, next_attempt_at from requests"
                " left join messages on messages.request_id = requests.id"
                " where state = ? and next_attempt_at <= ?"
                " order by priority, next_attempt_at limit ?",
                (state, now, limit + len(exclude)),
            )
            if row[0] not in exclude
        ]
        rows.sort(key=lambda r: (r[11], r[12]))
        return [_row(r) for r in rows[:limit]]

    def next_due_at(self) -> float | None:
        """When the earliest waiting request becomes due, or None when nothing waits.

        One index lookup per (state, priority): a plain `min()` over both states scanned them.
        """
        firsts = " union all ".join(
            f"select min(next_attempt_at) as at from requests"
            f" where state = '{state}' and priority = {priority}"
            for state in ("queued", "retry")
            for priority in sorted(PRIORITIES.values())
        )
        (when,) = self.db.execute(f"select min(at) from ({firsts})").fetchone()
        return float(when) if when is not None else None

    def record(self, starts: Sequence[Start], finishes: Sequence[Finish]) -> None:
        """Delivery bookkeeping of many requests in one transaction (a group commit).

        A start marks the request as in flight before the first byte goes to the server,
        keeping its rendered bytes (on the first attempt) so every retry sends the same
        message. A finish records the end of an attempt (or a render failure) and the new
        state. Starts are written first: a request may start and finish in the same batch.
        Not fsynced (see `transaction`): at worst a crash sends a message again.
        """
        with self.transaction(durable=False) as db:
            db.executemany(
                "update requests set state = 'sending', attempts = ?, recipients = ?,"
                " updated_at = ? where id = ?",
                [(s.number, orjson.dumps(s.row.recipients), s.at, s.row.id) for s in starts],
            )
            db.executemany(  # a no-op after the first attempt: the message is never re-rendered
                "insert or ignore into messages (request_id, message_id, envelope_from, data)"
                " values (?, ?, ?, ?)",
                [(s.row.id, s.row.message_id, s.row.envelope_from, s.row.message) for s in starts],
            )
            db.executemany(
                "insert or replace into attempts (request_id, number, started_at) values (?, ?, ?)",
                [(s.row.id, s.number, s.at) for s in starts],
            )
            db.executemany(
                "update requests set state = ?, next_attempt_at = coalesce(?, next_attempt_at),"
                " last_reply = ?, recipients = coalesce(?, recipients), delivered = ?,"
                " refused = coalesce(?, refused), updated_at = ? where id = ?",
                [
                    (
                        f.state,
                        f.next_attempt_at,
                        f.reply,
                        None if f.recipients is None else orjson.dumps(list(f.recipients)),
                        orjson.dumps(list(f.delivered)),
                        None if f.refused is None else orjson.dumps(f.refused),
                        f.at,
                        f.request_id,
                    )
                    for f in finishes
                ],
            )
            db.executemany(
                "update attempts set finished_at = ?, outcome = ?, code = ?, reply = ?"
                " where request_id = ? and number = ?",
                [
                    (f.at, f.state, f.code, f.reply, f.request_id, f.number)
                    for f in finishes
                    if f.number is not None
                ],
            )

    def release(self, starts: Sequence[Start]) -> None:
        """Undo starts whose send never began (a shutdown): the requests wait as before."""
        with self.transaction(durable=False) as db:
            db.executemany(
                "update requests set state = case when ? = 1 then 'queued' else 'retry' end,"
                " attempts = ? where id = ? and state = 'sending'",
                [(s.number, s.number - 1, s.row.id) for s in starts],
            )
            db.executemany(
                "delete from attempts where request_id = ? and number = ? and finished_at is null",
                [(s.row.id, s.number) for s in starts],
            )

    # -- reporting ---------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Requests per state, plus rejected frames; every state is present, zero or not."""
        counts = dict.fromkeys((*STATES, "rejected"), 0)
        for state, n in self.db.execute("select state, count(*) from requests group by state"):
            counts[state] = n
        (counts["rejected"],) = self.db.execute("select count(*) from rejected").fetchone()
        return counts

    def waiting_ids(self) -> list[str]:
        """Ids of the requests not yet sent or dead."""
        rows = self.db.execute(f"select id from requests where {WAITING}").fetchall()
        return [request_id for (request_id,) in rows]

    def oldest_waiting(self) -> float | None:
        """Creation time of the oldest request not yet sent or dead."""
        (when,) = self.db.execute(
            f"select min(created_at) from requests where {WAITING}"
        ).fetchone()
        return float(when) if when is not None else None

    def waiting(self) -> int:
        """How many requests are not yet sent or dead (cheap: reads only their index range)."""
        (n,) = self.db.execute(f"select count(*) from requests where {WAITING}").fetchone()
        return int(n)

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest dead requests and rejected frames, for `dispatcher status`."""
        dead = self.db.execute(
            "select updated_at, 'dead', id, template, last_reply from requests"
            " where state = 'dead' order by updated_at desc limit ?",
            (limit,),
        ).fetchall()
        rejected = self.db.execute(
            "select received_at, 'rejected', null, null, reason from rejected"
            " order by id desc limit ?",
            (limit,),
        ).fetchall()
        newest = sorted(dead + rejected, reverse=True)[:limit]
        keys = ("at", "state", "id", "template", "reason")
        return [dict(zip(keys, row, strict=True)) for row in newest]

    # -- administration (`dispatcher inspect`, `retry`, `purge`) -------------------------

    def inspect(self, request_id: str) -> dict[str, Any] | None:
        """Everything the spool holds about one request, or None if it holds nothing."""
        cursor = self.db.cursor()
        cursor.row_factory = sqlite3.Row  # this cursor only: columns by name
        found = cursor.execute(
            "select id, state, template, priority, created_at, updated_at, next_attempt_at,"
            " attempts, recipients, delivered, refused, last_reply, maybe_duplicate, request,"
            " message_id, envelope_from, data as message from requests"
            " left join messages on messages.request_id = requests.id where id = ?",
            (request_id,),
        ).fetchone()
        if found is None:
            return None
        report = dict(found)
        for key in ("recipients", "delivered", "refused", "request"):
            if report[key] is not None:
                report[key] = orjson.loads(report[key])
        report["maybe_duplicate"] = bool(report["maybe_duplicate"])
        report["attempt_log"] = [
            dict(attempt)
            for attempt in cursor.execute(
                "select number, started_at, finished_at, outcome, code, reply from attempts"
                " where request_id = ? order by number",
                (request_id,),
            )
        ]
        return report

    def retry(self, request_ids: Sequence[str] | None, now: float) -> list[str]:
        """Make requests due now: the given ones if they wait or are dead, else every dead one.

        A dead request gets its undelivered recipients back (also those refused with a 5xx:
        the operator retries because something was fixed). Its attempt count is kept, so one
        more temporary failure of a request past `retry.attempts` or `retry.max_age` makes it
        dead again. Returns the ids that were re-queued.
        """
        with self.transaction() as db:
            if request_ids is None:
                found = db.execute(
                    "select id, recipients, refused from requests where state = 'dead'"
                ).fetchall()
            else:
                marks = ", ".join("?" * len(request_ids))
                found = db.execute(
                    "select id, recipients, refused from requests"
                    f" where state in ('queued', 'retry', 'dead') and id in ({marks})",
                    list(request_ids),
                ).fetchall()
            for request_id, recipients, refused in found:
                if recipients is not None:  # rendered: the message goes to whoever lacks it
                    waiting = dict.fromkeys([*orjson.loads(recipients), *orjson.loads(refused)])
                    recipients = orjson.dumps(list(waiting))
                db.execute(
                    "update requests set state = case when attempts = 0 then 'queued'"
                    " else 'retry' end, next_attempt_at = ?, recipients = ?, refused = '{}',"
                    " updated_at = ? where id = ?",
                    (now, recipients, now, request_id),
                )
        return [request_id for request_id, _, _ in found]

    def purge(
        self, state: str, older_than: float | None, now: float, *, limit: int | None = None
    ) -> int:
        """Delete sent or dead requests (with their messages and attempts) that reached that
        state `older_than` seconds ago or more (None: all of them); returns how many.

        Deletes in transactions of at most PURGE_BATCH requests, so the daemon writing to the
        same spool never waits long for the lock. `limit` bounds one call, so the daemon can
        prune a backlog in slices between its other work.
        """
        if state not in ("sent", "dead"):
            raise ValueError(f"only sent or dead requests can be purged, not {state!r}")
        cutoff = float("inf") if older_than is None else now - older_than
        purged = 0
        while True:
            batch = PURGE_BATCH if limit is None else min(PURGE_BATCH, limit - purged)
            with self.transaction(durable=False) as db:
                ids = db.execute(
                    "select id from requests where state = ? and updated_at <= ? limit ?",
                    (state, cutoff, batch),
                ).fetchall()
                db.executemany("delete from attempts where request_id = ?", ids)
                db.executemany("delete from messages where request_id = ?", ids)
                db.executemany("delete from requests where id = ?", ids)
            purged += len(ids)
            if len(ids) < batch or purged == limit:
                return purged


def _row(r: tuple[Any, ...]) -> Row:
    return Row(
        id=r[0],
        template=r[1],
        request=r[2],
        created_at=r[3],
        attempts=r[4],
        envelope_from=r[5],
        recipients=None if r[6] is None else orjson.loads(r[6]),
        delivered=orjson.loads(r[7]),
        refused=orjson.loads(r[8]),
        message=r[9],
        message_id=r[10],
    )


def now() -> float:
    """Wall-clock seconds; one place, so tests and the spool agree on the clock."""
    return time.time()
