"""The PostgreSQL spool: one database shared by the daemons of several hosts.

Each daemon holds one connection and commits each batch in one transaction, so a receipt still
means "committed". Claims take rows with `FOR UPDATE SKIP LOCKED` and record an owner and a
lease, so daemons never wait for each other's rows and a dead daemon's claims lapse. A failure
that may pass (the server restarting, the network, a timeout) raises `StoreUnavailable` and
drops the connection; the next call connects again.
"""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self

import orjson

from dispatcher.errors import SettingsError, SpoolError, StartupError, StoreUnavailable
from dispatcher.settings import SpoolSettings
from dispatcher.spool import postgres_schema
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

try:
    import psycopg
    from psycopg.rows import dict_row
except ImportError:  # an optional extra: the SQLite spool needs none of it
    raise SettingsError(
        "spool.url: a PostgreSQL spool needs psycopg 3: pip install 'dispatcher[postgres]'"
    ) from None

log = logging.getLogger(__name__)

WAITING = "state in ('queued', 'retry', 'sending')"  # not yet sent or dead
# Sent on connecting: our tables, and no statement that hangs the daemon's loop for long.
SESSION = f"set search_path to {postgres_schema.SCHEMA_NAME}; set statement_timeout = '30s'"
# libpq options unless the URL sets them: a dead server or network is noticed in seconds.
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",  # ms a write may wait for the server's acknowledgement
}
# What may pass: the server or network down, a timeout, a full disk, or (after a failover) a
# connection that still reaches the old primary, now read-only; a new connection may succeed.
UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
)
# A daemon's connection, besides SESSION. Delivery bookkeeping need not wait for the disk
# (`transaction` makes accepting durable). Its statements touch a few rows by key or in the
# order of an index: an index scan is always right for them, while the planner, on the
# statistics of a queue table that filled a moment ago, would sort or scan every waiting row
# on each claim until autovacuum caught up.
BOOKKEEPING = "set synchronous_commit = off; set enable_seqscan = off; set enable_bitmapscan = off"
# What libpq says when the server answered but refused the connection's settings.
REFUSED_BY_SERVER = ("password", "authentication", "does not exist", "pg_hba.conf", "denied")
DURABLE = "select set_config('synchronous_commit', 'on', true)"  # this transaction waits


def _sql(statement: str) -> str:
    """A statement shared with the SQLite store, in psycopg's placeholder style."""
    return statement.replace("?", "%s")


class PostgresReader:
    """Queries for reports over one connection that never writes; psycopg serialises its use
    across threads."""

    def __init__(self, settings: SpoolSettings, *, read_only: bool = True) -> None:
        assert settings.url is not None
        self.settings = settings
        self.read_only = read_only
        self._db: psycopg.Connection[Any] | None = None
        with self._unavailable_as(SpoolError):
            found = postgres_schema.version(self._connection().cursor())
        if read_only and found is None:
            raise SpoolError(f"no spool in {settings.url} (has a daemon ever run on it?)")
        if found is not None and found > postgres_schema.VERSION:
            raise SpoolError(f"spool.url: {settings.url} was written by a newer dispatcher")

    # -- the connection ----------------------------------------------------------------

    def _connection(self) -> "psycopg.Connection[Any]":
        """The open connection, or a new one (after a failure dropped the last)."""
        if self._db is None:
            url = self.settings.url or ""
            try:
                given = psycopg.conninfo.conninfo_to_dict(url)
            except psycopg.ProgrammingError as exc:
                raise SettingsError(f"spool.url: not a valid libpq URL: {exc}") from None
            defaults = CONNECT_DEFAULTS
            if not self.read_only:  # of the hosts a URL lists, the primary (after a failover)
                defaults = {**defaults, "target_session_attrs": "read-write"}
            options = {k: v for k, v in defaults.items() if k not in given}
            password = self.settings.password()
            if password is not None:
                options["password"] = password
            conninfo = psycopg.conninfo.make_conninfo(url, **options)
            self._db = psycopg.connect(conninfo, autocommit=True)  # closed by a failure below
            self._db.execute(SESSION)
            self._db.execute(
                "set default_transaction_read_only = on" if self.read_only else BOOKKEEPING
            )
        return self._db

    @contextmanager
    def _unavailable_as(self, error: type[SpoolError]) -> Iterator[None]:
        """Turn a failure of the server or the connection into `error`, and drop the
        connection so the next call makes a new one."""
        try:
            yield
        except UNAVAILABLE as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise error(f"spool.url {self.settings.url}: {reason}") from exc

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read on its own (autocommit), or StoreUnavailable."""
        with self._unavailable_as(StoreUnavailable):
            return self._connection().execute(statement, params).fetchall()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reports -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((*STATES, "rejected"), 0)
        rows = self._query(
            "select state, count(*) from requests group by state"
            " union all select 'rejected', count(*) from rejected"
        )
        counts.update((state, int(n)) for state, n in rows)
        return counts

    def waiting_ids(self) -> list[str]:
        return [
            request_id for (request_id,) in self._query(f"select id from requests where {WAITING}")
        ]

    def oldest_waiting(self) -> float | None:
        ((when,),) = self._query(f"select min(created_at) from requests where {WAITING}")
        return None if when is None else float(when)

    def waiting(self) -> int:
        ((n,),) = self._query(f"select count(*) from requests where {WAITING}")
        return int(n)

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        dead = self._query(
            "select updated_at, 'dead', id, template, last_reply from requests"
            " where state = 'dead' order by updated_at desc limit %s",
            (limit,),
        )
        rejected = self._query(
            "select received_at, 'rejected', null, null, reason from rejected"
            " order by id desc limit %s",
            (limit,),
        )
        return newest_failures(dead, rejected, limit)

    def tag_counts(self, tag: str, templates: Sequence[str] = ()) -> dict[str, int]:
        # A scan, as befits an operator's command: tags live in the stored request only, so
        # intake writes nothing more. position() skips parsing the JSON of requests without it.
        counts = dict.fromkeys(STATES, 0)
        rows = self._query(
            "select state, count(*) from requests where (position(%s in request) > 0"
            " and convert_from(request, 'UTF8')::jsonb -> 'tags' ? %s) or template = any(%s)"
            " group by state",
            (orjson.dumps(tag), tag, list(templates)),
        )
        counts.update((state, int(n)) for state, n in rows)
        return counts

    def failures_mark(self) -> str:
        ((dead, latest, rejected),) = self._query(
            "select count(*), max(updated_at), (select max(id) from rejected) from requests"
            " where state = 'dead'"
        )
        return f"{dead}:{latest}:{rejected}"

    def inspect(self, request_id: str) -> dict[str, Any] | None:
        with self._unavailable_as(StoreUnavailable):
            db = self._connection()
            with db.cursor(row_factory=dict_row) as cursor:
                found = cursor.execute(
                    f"select {INSPECTED_COLUMNS} from requests"
                    " left join messages on messages.request_id = requests.id where id = %s",
                    (request_id,),
                ).fetchone()
            if found is None:
                return None
            attempts = db.execute(
                f"select {', '.join(ATTEMPT_COLUMNS)} from attempts"
                " where request_id = %s order by number",
                (request_id,),
            ).fetchall()
        return inspected(found, attempts)

    def daemons(self) -> list[dict[str, Any]]:
        rows = self._query(
            "select owner, started_at, last_heartbeat from daemons order by last_heartbeat desc"
        )
        return [dict(zip(DAEMON_KEYS, row, strict=True)) for row in rows]

    def relays(self) -> list[dict[str, Any]]:
        found = self._query(f"select {RELAY_COLUMNS} from relays order by owner, position")
        return relay_states(found)

    def write_problem(self) -> str | None:
        """None: a client cannot see the server's disk. A server that is down fails the report
        itself; any other failing write is named in the daemon's log and its status line."""
        return None


class PostgresSpool(PostgresReader):
    """A daemon's (or an admin command's) read-write view, claims made as `owner`."""

    def __init__(self, settings: SpoolSettings, owner: str) -> None:
        self.owner = owner
        self.lease = settings.lease
        self.migrated = False
        try:
            super().__init__(settings, read_only=False)  # connects, then migrates (below)
        except SpoolError as exc:  # it names the URL already
            self.close()
            if not _unreachable(exc):
                raise StartupError(str(exc)) from None
            log.warning("%s; the schema is checked once the database answers", exc)

    def _connection(self) -> "psycopg.Connection[Any]":
        """The open connection; the first one migrates the schema, so that a daemon that
        starts while the database is down serves (its writes unavailable) until it is up."""
        db = super()._connection()
        if not self.migrated:
            try:
                with db.transaction():
                    postgres_schema.migrate(db.cursor())
            except ValueError as exc:  # a newer release's schema: nothing is written to it
                raise StoreUnavailable(f"spool.url {self.settings.url}: {exc}") from None
            self.migrated = True
        return db

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator["psycopg.Cursor[Any]"]:
        """A write transaction: committed on success, rolled back on any exception; a
        failure that may pass is `StoreUnavailable`, with nothing of it kept.

        `durable=False` does not wait for the commit to reach the disk (as the SQLite
        spool's): a crash of the server can only undo delivery bookkeeping, which at worst
        sends a message again. Accepting a request is always durable.
        """
        with self._unavailable_as(StoreUnavailable):
            db = self._connection()
            with db.transaction(), db.cursor() as cursor:
                if durable:
                    cursor.execute(DURABLE)
                yield cursor

    def _bookkeep(self, statement: str, params: Sequence[Any] = ()) -> "psycopg.Cursor[Any]":
        """One statement of delivery bookkeeping, a transaction of its own (not durable):
        a single round trip, with no BEGIN and COMMIT around it."""
        with self._unavailable_as(StoreUnavailable):
            return self._connection().execute(statement, params)

    # -- intake ------------------------------------------------------------------------

    def add(
        self, requests: Sequence[Incoming], rejections: Sequence[tuple[str, bytes]], now: float
    ) -> list[str]:
        """One statement for the whole batch; `on conflict do nothing` skips an id or an
        idempotency key already held, by any daemon, and `returning` names the new ones."""
        with self.transaction() as cursor:
            returned: set[str] = set()
            if requests:
                cursor.execute(
                    "insert into requests (id, idempotency_key, template, request, state,"
                    " priority, created_at, send_at, next_attempt_at, updated_at)"
                    " select id, key, template, request, 'queued', priority, %s, due,"
                    " coalesce(due, %s), %s from unnest(%s::text[], %s::text[], %s::text[],"
                    " %b::bytea[], %s::integer[], %s::float8[])"
                    " as batch (id, key, template, request, priority, due)"
                    " on conflict do nothing returning id",
                    (
                        now,
                        now,
                        now,
                        [r.id for r in requests],
                        [r.idempotency_key for r in requests],
                        [r.template for r in requests],
                        [r.request for r in requests],
                        [r.priority for r in requests],
                        [r.due for r in requests],
                    ),
                )
                returned = {request_id for (request_id,) in cursor.fetchall()}
            if rejections:
                cursor.executemany(
                    "insert into rejected (received_at, reason, excerpt) values (%s, %s, %s)",
                    [(now, reason, frame[:EXCERPT_BYTES]) for reason, frame in rejections],
                )
        return [r for r in dict.fromkeys(r.id for r in requests) if r in returned]

    # -- claims ------------------------------------------------------------------------

    def claim(self, now: float, limit: int) -> list[Row]:
        """Rows another daemon is claiming at this moment are skipped, not waited for."""
        if limit <= 0:
            return []
        found = self._bookkeep(
            "with picked as (select id from requests"
            " where state in ('queued', 'retry') and next_attempt_at <= %s"
            " and (claimed_by is null or lease_until < %s)"
            " order by priority, next_attempt_at limit %s for update skip locked),"
            " claimed as (update requests set claimed_by = %s, lease_until = %s"
            " from picked where requests.id = picked.id returning requests.*)"
            # The rows as updated, not as the statement began: another daemon may have
            # changed one after that and before this claim locked it.
            f" select {ROW_COLUMNS} from claimed"
            " left join messages on messages.request_id = claimed.id",
            (now, now, limit, self.owner, now + self.lease),
        ).fetchall()
        return sorted((row_of(r) for r in found), key=lambda row: (row.priority, row.due))

    def next_due_at(self) -> float | None:
        # The first row of each priority in the claim's index: `order by ... limit 1`, as
        # `min()` over a table the planner thinks small would read every waiting row.
        firsts = " union all ".join(
            "(select next_attempt_at as at from requests"
            f" where state in ('queued', 'retry') and priority = {priority}"
            " order by next_attempt_at limit 1)"
            for priority in sorted(PRIORITIES.values())
        )
        ((when,),) = self._query(f"select min(at) from ({firsts}) as firsts")
        return None if when is None else float(when)

    def heartbeat(self, now: float, *, starting: bool = False) -> None:
        self._bookkeep(_sql(HEARTBEAT), (self.owner, now, now, starting))

    def due(self, chore: str, every: float, now: float) -> bool:
        return self._bookkeep(_sql(CHORE), (chore, now, self.owner, every)).fetchone() is not None

    def set_relays(self, states: Sequence[RelayState], now: float) -> None:
        with self.transaction(durable=False) as cursor:
            cursor.execute("delete from relays where owner = %s", (self.owner,))
            cursor.executemany(
                "insert into relays (owner, relay, position, up, since, reason, updated_at)"
                " values (%s, %s, %s, %s, %s, %s, %s)",
                [
                    (self.owner, s.relay, n, s.up, s.since, s.reason, now)
                    for n, s in enumerate(states)
                ],
            )

    def renew(self, now: float) -> int:
        with self.transaction(durable=False) as cursor:
            cursor.execute(
                f"update requests set lease_until = %s where {WAITING} and claimed_by = %s",
                (now + self.lease, self.owner),
            )
            return self._free(
                cursor, now, "claimed_by != %s and lease_until < %s", (self.owner, now)
            )

    def recover(self, now: float) -> int:
        with self.transaction() as cursor:
            return self._free(
                cursor,
                now,
                "(claimed_by = %s or lease_until is null or lease_until < %s)",
                (self.owner, now),
            )

    @staticmethod
    def _free(cursor: "psycopg.Cursor[Any]", now: float, which: str, args: tuple[Any, ...]) -> int:
        """End the claims `which` selects; returns how many sends they had begun, which go
        again flagged as possible duplicates."""
        cursor.execute(  # a count, not `rowcount`: a pipeline has none before it syncs
            "with freed as (update requests set state = 'retry', maybe_duplicate = true,"
            " next_attempt_at = %s, updated_at = %s, claimed_by = null, lease_until = null"
            f" where state = 'sending' and {which} returning 1) select count(*) from freed",
            (now, now, *args),
        )
        (interrupted,) = cursor.fetchone() or (0,)
        cursor.execute(UNCLAIM_WAITING + which, args)
        return int(interrupted)

    def release(self, request_ids: Sequence[str], not_before: float | None = None) -> None:
        ids = list(request_ids)
        with self.transaction(durable=False) as cursor:
            cursor.execute(
                "delete from attempts using requests where attempts.request_id = requests.id"
                " and requests.id = any(%s) and attempts.finished_at is null"
                " and requests.state = 'sending' and requests.claimed_by = %s",
                (ids, self.owner),
            )
            # PostgreSQL, as SQLite, evaluates every SET expression on the row as it was.
            cursor.execute(
                "update requests set claimed_by = null, lease_until = null,"
                " next_attempt_at = greatest(next_attempt_at, coalesce(%s::float8, 0)),"
                " state = case when state != 'sending' then state"
                "   when attempts <= 1 then 'queued' else 'retry' end,"
                " attempts = attempts - case when state = 'sending' then 1 else 0 end"
                " where id = any(%s) and claimed_by = %s",
                (not_before, ids, self.owner),
            )

    # -- delivery bookkeeping ----------------------------------------------------------

    def record(self, starts: Sequence[Start], finishes: Sequence[Finish]) -> None:
        """Starts, then finishes (a request may start and finish in the same batch): one
        statement each, so one of them alone is one round trip."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if starts:
            statements.append((STARTS, _columns([_start(s) for s in starts])))
        if finishes:
            rows = _columns([_finish(f) for f in finishes])
            statements.append((FINISHES, (*rows, self.owner)))
        if len(statements) == 1:
            self._bookkeep(*statements[0])
        elif statements:
            with self.transaction(durable=False) as cursor:
                for statement, params in statements:
                    cursor.execute(statement, params)

    # -- administration ----------------------------------------------------------------

    def retry(self, request_ids: Sequence[str] | None, now: float) -> list[str]:
        """As the SQLite spool's: a dead request gets its undelivered recipients back, and
        keeps its attempt count."""
        with self.transaction() as cursor:
            if request_ids is None:
                cursor.execute(
                    "select id, recipients, refused from requests where state = 'dead' for update"
                )
            else:
                cursor.execute(
                    "select id, recipients, refused from requests"
                    " where state in ('queued', 'retry', 'dead') and id = any(%s) for update",
                    (list(request_ids),),
                )
            found = cursor.fetchall()
            updates = []
            for request_id, recipients, refused in found:
                if recipients is not None:  # rendered: the message goes to whoever lacks it
                    waiting = dict.fromkeys([*orjson.loads(recipients), *orjson.loads(refused)])
                    recipients = _json(list(waiting))
                updates.append((now, recipients, now, request_id))
            cursor.executemany(
                "update requests set state = case when attempts = 0 then 'queued'"
                " else 'retry' end, next_attempt_at = %s, recipients = %s, refused = '{}',"
                " updated_at = %s where id = %s",
                updates,
            )
        return [request_id for request_id, _, _ in found]

    def purge(
        self, state: str, older_than: float | None, now: float, *, limit: int | None = None
    ) -> int:
        """Deletes in transactions of at most PURGE_BATCH requests (their attempts and
        messages go with them); rows another purge holds are skipped, not waited for."""
        return purge_in_batches(state, older_than, now, limit, self._delete)

    def _delete(self, state: str, cutoff: float, batch: int) -> int:
        with self.transaction(durable=False) as cursor:
            cursor.execute(
                "with gone as (delete from requests where id in (select id from requests"
                " where state = %s and updated_at <= %s limit %s for update skip locked)"
                " returning 1) select count(*) from gone",
                (state, cutoff, batch),
            )
            (deleted,) = cursor.fetchone() or (0,)
        return int(deleted)


# Attempts begun: the request is `sending`, its message kept (rendered once: a retry keeps the
# first), the attempt recorded (again, if a start was undone by a release).
STARTS = (
    "with s as (select * from unnest(%s::text[], %s::integer[], %s::text[], %s::float8[],"
    " %s::text[], %s::text[], %b::bytea[])"
    " as s (id, number, recipients, at, message_id, envelope_from, data)),"
    " kept as (insert into messages (request_id, message_id, envelope_from, data)"
    " select id, message_id, envelope_from, data from s on conflict do nothing),"
    " begun as (insert into attempts (request_id, number, started_at)"
    " select id, number, at from s on conflict (request_id, number) do update set"
    " started_at = excluded.started_at, finished_at = null, outcome = null, code = null,"
    " reply = null)"
    " update requests set state = 'sending', attempts = s.number, recipients = s.recipients,"
    " updated_at = s.at from s where requests.id = s.id"
)
# Attempts (or renders) ended: the request's new state, and the end of its claim unless
# another daemon has claimed it since; the attempt's outcome.
FINISHES = (
    "with f as (select * from unnest(%s::text[], %s::text[], %s::float8[], %s::text[],"
    " %s::text[], %s::text[], %s::text[], %s::float8[], %s::boolean[], %s::integer[],"
    " %s::integer[]) as f (id, state, next_attempt_at, reply, recipients, delivered, refused,"
    " at, maybe_duplicate, number, code)),"
    " ended as (update attempts set finished_at = f.at, outcome = f.state, code = f.code,"
    " reply = f.reply from f where attempts.request_id = f.id and attempts.number = f.number)"
    " update requests set state = f.state,"
    " next_attempt_at = coalesce(f.next_attempt_at, requests.next_attempt_at),"
    " last_reply = f.reply, recipients = coalesce(f.recipients, requests.recipients),"
    " delivered = f.delivered, refused = coalesce(f.refused, requests.refused),"
    " updated_at = f.at, claimed_by = null, lease_until = null,"
    " maybe_duplicate = requests.maybe_duplicate or f.maybe_duplicate"
    " from f where requests.id = f.id"
    " and (requests.claimed_by is null or requests.claimed_by = %s)"
)


def _unreachable(exc: SpoolError) -> bool:
    """Whether the server could not be reached (it may be later), rather than refused these
    settings (a password, a database name: a mistake to report at start)."""
    refused = any(word in str(exc) for word in REFUSED_BY_SERVER)
    return isinstance(exc.__cause__, UNAVAILABLE) and not refused


def _start(s: Start) -> tuple[Any, ...]:
    """A start as a row of STARTS."""
    row = s.row
    return (
        row.id,
        s.number,
        _json(row.recipients),
        s.at,
        row.message_id,
        row.envelope_from,
        row.message,
    )


def _finish(f: Finish) -> tuple[Any, ...]:
    """A finish as a row of FINISHES."""
    return (
        f.request_id,
        f.state,
        f.next_attempt_at,
        f.reply,
        None if f.recipients is None else _json(list(f.recipients)),
        _json(list(f.delivered)),
        None if f.refused is None else _json(f.refused),
        f.at,
        f.maybe_duplicate,
        f.number,
        f.code,
    )


def _columns(rows: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
    """Rows as one list per column, for `unnest()`: a batch in one statement, not one each."""
    return tuple(map(list, zip(*rows, strict=True)))


def _json(value: object) -> str:
    """JSON as text for a text column (psycopg would send bytes as bytea)."""
    return orjson.dumps(value).decode()
