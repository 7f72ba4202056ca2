"""The SQLite spool: one file beside the daemon, the embedded default.

A request is acknowledged only once the transaction holding it has committed, so the pragmas
below are chosen for that promise, not for speed; speed comes from committing whole batches.
"""

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import orjson

from dispatcher.errors import SpoolError, StartupError, StoreUnavailable
from dispatcher.permissions import private_dir, private_file
from dispatcher.spool import sqlite_schema
from dispatcher.spool.records import (
    DAEMON_KEYS,
    EXCERPT_BYTES,
    STATES,
    Finish,
    Incoming,
    RelayState,
    Row,
    Start,
    inspected,
    newest_failures,
    purge_in_batches,
    relay_states,
    row_of,
)
from dispatcher.spool.sql import (
    ATTEMPT_COLUMNS,
    CHORE,
    HEARTBEAT,
    INSPECTED_COLUMNS,
    RELAY_COLUMNS,
    ROW_COLUMNS,
    UNCLAIM_WAITING,
)
from dispatcher.wire import PRIORITIES

WAITING = "state in ('queued', 'retry', 'sending')"  # not yet sent or dead
PARAMETERS = 500  # ids bound per statement, under SQLite's limit
# Primary result codes of a write that may succeed later: BUSY, LOCKED (past the busy timeout),
# NOMEM, READONLY (a file system remounted read-only), IOERR, FULL, CANTOPEN, PROTOCOL.
PASSING = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
LOW_SPACE = 1024 * 1024  # free bytes under which `status` warns that the spool's disk is full


class SqliteReader:
    """Read-only queries over one connection; safe from any thread, never writes."""

    db: sqlite3.Connection

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        if not path.exists():
            raise SpoolError(f"no spool at {path} (has the daemon ever run?)")
        try:
            # mode=ro: a WAL reader never waits for, nor stalls, the daemon writing.
            self.db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=timeout,
                check_same_thread=False,
            )
            (version,) = self.db.execute("pragma user_version").fetchone()
        except sqlite3.Error as exc:  # a reader creates the -shm file when no daemon has it
            why = "; ".join(filter(None, [str(exc), self.write_problem()]))
            raise SpoolError(f"spool.path: cannot read {path}: {why}") from None
        self.version = int(version)
        if version > sqlite_schema.VERSION:
            raise SpoolError(f"spool.path: {path} was written by a newer dispatcher")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_problem(self) -> str | None:
        """A full file system: what makes the daemon's writes fail most often."""
        try:
            space = os.statvfs(self.path.parent)
        except OSError as exc:
            return f"cannot check the free space beside {self.path}: {exc.strerror}"
        free = space.f_bavail * space.f_frsize
        if free >= LOW_SPACE:
            return None
        return f"the file system holding {self.path} is full ({free // 1024} KiB free)"

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((*STATES, "rejected"), 0)
        for state, n in self.db.execute("select state, count(*) from requests group by state"):
            counts[state] = n
        (counts["rejected"],) = self.db.execute("select count(*) from rejected").fetchone()
        return counts

    def waiting_ids(self) -> list[str]:
        rows = self.db.execute(f"select id from requests where {WAITING}").fetchall()
        return [request_id for (request_id,) in rows]

    def oldest_waiting(self) -> float | None:
        (when,) = self.db.execute(
            f"select min(created_at) from requests where {WAITING}"
        ).fetchone()
        return float(when) if when is not None else None

    def waiting(self) -> int:
        # Cheap: reads only the waiting states' range of the requests_due index.
        (n,) = self.db.execute(f"select count(*) from requests where {WAITING}").fetchone()
        return int(n)

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
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
        return newest_failures(dead, rejected, limit)

    def tag_counts(self, tag: str, templates: Sequence[str] = ()) -> dict[str, int]:
        # A scan, as befits an operator's command: tags live in the stored request only, so
        # intake writes nothing more. instr() skips parsing the JSON of requests without it.
        counts = dict.fromkeys(STATES, 0)
        marks = ", ".join("?" * len(templates))
        rows = self.db.execute(
            "select state, count(*) from requests where (instr(request, ?) > 0 and exists"
            " (select 1 from json_each(cast(request as text), '$.tags') where value = ?))"
            f" or template in ({marks}) group by state",
            (orjson.dumps(tag).decode(), tag, *templates),
        )
        for state, n in rows:
            counts[state] = n
        return counts

    def failures_mark(self) -> str:
        (dead, latest) = self.db.execute(
            "select count(*), max(updated_at) from requests where state = 'dead'"
        ).fetchone()
        (rejected,) = self.db.execute("select max(id) from rejected").fetchone()
        return f"{dead}:{latest}:{rejected}"

    def inspect(self, request_id: str) -> dict[str, Any] | None:
        cursor = self.db.cursor()
        cursor.row_factory = sqlite3.Row  # this cursor only: columns by name
        found = cursor.execute(
            f"select {INSPECTED_COLUMNS} from requests"
            " left join messages on messages.request_id = requests.id where id = ?",
            (request_id,),
        ).fetchone()
        if found is None:
            return None
        attempts = self.db.execute(
            f"select {', '.join(ATTEMPT_COLUMNS)} from attempts"
            " where request_id = ? order by number",
            (request_id,),
        ).fetchall()
        return inspected(dict(found), attempts)

    def daemons(self) -> list[dict[str, Any]]:
        if self.version < 3:  # a spool no daemon of this release has opened yet
            return []
        rows = self.db.execute(
            "select owner, started_at, last_heartbeat from daemons order by last_heartbeat desc"
        ).fetchall()
        return [dict(zip(DAEMON_KEYS, row, strict=True)) for row in rows]

    def relays(self) -> list[dict[str, Any]]:
        if self.version < 2:  # a spool no daemon of this release has opened yet
            return []
        found = self.db.execute(
            f"select {RELAY_COLUMNS} from relays order by owner, rowid"  # as configured
        ).fetchall()
        return relay_states(found)


class SqliteSpool(SqliteReader):
    """The daemon's connection to the spool file; used from one thread (its event loop)."""

    def __init__(self, path: Path, owner: str, *, lease: float = 60.0, timeout: float = 5.0):
        self.path = path
        self.owner = owner
        self.lease = lease
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
            with self.transaction() as db:
                sqlite_schema.migrate(db)
            self.version = sqlite_schema.VERSION
        except (OSError, sqlite3.Error, ValueError, StoreUnavailable) as exc:
            raise StartupError(f"spool.path: cannot open {path}: {exc}") from None

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception.

        `durable=False` skips the fsync (synchronous=NORMAL): still safe against a crash of
        the process, and a power loss can only undo delivery bookkeeping, which at worst
        sends a message again. Accepting a request is always durable.

        A failure that may pass (a full disk, a lock held past the timeout) is raised as
        `StoreUnavailable`, with nothing of the transaction kept.
        """
        try:
            if durable != self.durable:
                self.db.execute(f"pragma synchronous={'full' if durable else 'normal'}")
                self.durable = durable
            self.db.execute("begin immediate")
            try:
                yield self.db
                self.db.execute("commit")
            except BaseException:
                self._roll_back()
                raise
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)  # None: not an error of SQLite's
            if code is not None and code & 0xFF in PASSING:
                raise StoreUnavailable(f"spool {self.path}: {exc}") from exc
            raise

    def _roll_back(self) -> None:
        """Undo what is left of a transaction: a failed COMMIT may have ended it already (SQLite
        then has nothing to roll back), and a rollback that fails leaves nothing to do more."""
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("rollback")

    # -- intake ------------------------------------------------------------------------

    def add(
        self,
        requests: Sequence[Incoming],
        rejections: Sequence[tuple[str, bytes]],
        now: float,
    ) -> list[str]:
        rows = [
            (
                r.id,
                r.idempotency_key,
                r.template,
                r.request,
                r.priority,
                now,
                r.due,
                now if r.due is None else r.due,
                now,
            )
            for r in requests
        ]
        with self.transaction() as db:
            before = db.total_changes
            db.executemany(
                "insert or ignore into requests (id, idempotency_key, template, request, state,"
                " priority, created_at, send_at, next_attempt_at, updated_at)"
                " values (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
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
        for start in range(0, len(ids), PARAMETERS):
            chunk = ids[start : start + PARAMETERS]
            found.update(
                request_id
                for (request_id,) in db.execute(
                    f"select id from requests where created_at = ? and id in"
                    f" ({', '.join('?' * len(chunk))})",
                    (now, *chunk),
                )
            )
        return [request_id for request_id in dict.fromkeys(ids) if request_id in found]

    # -- claims ------------------------------------------------------------------------

    def claim(self, now: float, limit: int) -> list[Row]:
        """One query per waiting state: with `state in (...)` SQLite sorts every waiting row
        in a temporary B-tree on each call, which made a deep queue cost O(n) per message. Per
        state it walks the `requests_due` index in order, skips live claims, stops at `limit`.
        """
        if limit <= 0:
            return []
        with self.transaction(durable=False) as db:
            found = [
                row
                for state in ("queued", "retry")
                for row in db.execute(
                    f"select {ROW_COLUMNS} from requests"
                    " left join messages on messages.request_id = requests.id"
                    " where state = ? and next_attempt_at <= ?"
                    " and (claimed_by is null or lease_until < ?)"
                    " order by priority, next_attempt_at limit ?",
                    (state, now, now, limit),
                )
            ]
            found.sort(key=lambda r: (r[11], r[12]))
            rows = [row_of(r) for r in found[:limit]]
            db.executemany(
                "update requests set claimed_by = ?, lease_until = ? where id = ?",
                [(self.owner, now + self.lease, row.id) for row in rows],
            )
        return rows

    def next_due_at(self) -> float | None:
        # One index lookup per (state, priority): a plain `min()` over both states scanned them.
        firsts = " union all ".join(
            f"select min(next_attempt_at) as at from requests"
            f" where state = '{state}' and priority = {priority}"
            for state in ("queued", "retry")
            for priority in sorted(PRIORITIES.values())
        )
        (when,) = self.db.execute(f"select min(at) from ({firsts})").fetchone()
        return float(when) if when is not None else None

    def renew(self, now: float) -> int:
        with self.transaction(durable=False) as db:
            db.execute(
                "update requests set lease_until = ? where claimed_by = ?",
                (now + self.lease, self.owner),
            )
            return self._free(db, now, "claimed_by != ? and lease_until < ?", (self.owner, now))

    def heartbeat(self, now: float, *, starting: bool = False) -> None:
        with self.transaction(durable=False) as db:
            db.execute(HEARTBEAT, (self.owner, now, now, starting))

    def due(self, chore: str, every: float, now: float) -> bool:
        with self.transaction(durable=False) as db:
            return db.execute(CHORE, (chore, now, self.owner, every)).fetchone() is not None

    def recover(self, now: float) -> int:
        with self.transaction() as db:
            return self._free(
                db,
                now,
                "(claimed_by = ? or lease_until is null or lease_until < ?)",
                (self.owner, now),
            )

    @staticmethod
    def _free(db: sqlite3.Connection, now: float, which: str, args: tuple[Any, ...]) -> int:
        """End the claims `which` selects; returns how many sends they had begun.

        A send begun goes again, flagged as a possible duplicate: the server may have it.
        """
        interrupted = db.execute(
            "update requests set state = 'retry', maybe_duplicate = 1, next_attempt_at = ?,"
            f" updated_at = ?, claimed_by = null, lease_until = null"
            f" where state = 'sending' and {which}",
            (now, now, *args),
        ).rowcount
        db.execute(UNCLAIM_WAITING + which, args)
        return int(interrupted)

    def release(self, request_ids: Sequence[str], not_before: float | None = None) -> None:
        # SQLite evaluates every SET expression on the row as it was.
        with self.transaction(durable=False) as db:
            db.executemany(
                "delete from attempts where request_id = ? and finished_at is null"
                " and exists (select 1 from requests where id = request_id and state = 'sending'"
                " and claimed_by = ?)",
                [(request_id, self.owner) for request_id in request_ids],
            )
            db.executemany(
                "update requests set claimed_by = null, lease_until = null,"
                " next_attempt_at = max(next_attempt_at, coalesce(?, 0)),"
                " state = case when state != 'sending' then state"
                "   when attempts <= 1 then 'queued' else 'retry' end,"
                " attempts = attempts - (state = 'sending')"
                " where id = ? and claimed_by = ?",
                [(not_before, request_id, self.owner) for request_id in request_ids],
            )

    # -- delivery bookkeeping ----------------------------------------------------------

    def record(self, starts: Sequence[Start], finishes: Sequence[Finish]) -> None:
        # Starts are written first: a request may start and finish in the same batch.
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
                " refused = coalesce(?, refused), updated_at = ?, claimed_by = null,"
                " lease_until = null, maybe_duplicate = max(maybe_duplicate, ?)"
                " where id = ? and (claimed_by is null or claimed_by = ?)",
                [
                    (
                        f.state,
                        f.next_attempt_at,
                        f.reply,
                        None if f.recipients is None else orjson.dumps(list(f.recipients)),
                        orjson.dumps(list(f.delivered)),
                        None if f.refused is None else orjson.dumps(f.refused),
                        f.at,
                        f.maybe_duplicate,
                        f.request_id,
                        self.owner,
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

    def set_relays(self, states: Sequence[RelayState], now: float) -> None:
        with self.transaction(durable=False) as db:
            db.execute("delete from relays where owner = ?", (self.owner,))
            db.executemany(
                "insert into relays (owner, relay, up, since, reason, updated_at)"
                " values (?, ?, ?, ?, ?, ?)",
                [(self.owner, s.relay, s.up, s.since, s.reason, now) for s in states],
            )

    # -- administration ----------------------------------------------------------------

    def retry(self, request_ids: Sequence[str] | None, now: float) -> list[str]:
        """A dead request gets its undelivered recipients back (also those refused with a
        5xx: the operator retries because something was fixed). Its attempt count is kept, so
        one more temporary failure past `retry.attempts` or `retry.max_age` makes it dead
        again."""
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
        """Deletes in transactions of at most PURGE_BATCH requests, so the daemon writing to
        the same spool never waits long for the lock; `limit` bounds one call, so the daemon
        can prune a backlog in slices between its other work."""
        return purge_in_batches(state, older_than, now, limit, self._delete)

    def _delete(self, state: str, cutoff: float, batch: int) -> int:
        with self.transaction(durable=False) as db:
            ids = db.execute(
                "select id from requests where state = ? and updated_at <= ? limit ?",
                (state, cutoff, batch),
            ).fetchall()
            db.executemany("delete from attempts where request_id = ?", ids)
            db.executemany("delete from messages where request_id = ?", ids)
            db.executemany("delete from requests where id = ?", ids)
        return len(ids)
