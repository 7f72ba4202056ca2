"""The SQLite spool's schema, versioned in `PRAGMA user_version` and migrated at start.

A new spool gets `SCHEMA` at `VERSION`; an older one gets each step of `MIGRATIONS` after its
version, in the same transaction that checks it, so two daemons starting together cannot both
migrate. Version 0 is the unversioned spool of release 0.1.0.
"""

import sqlite3
from collections.abc import Callable
from datetime import datetime

import orjson

# Each daemon's relays (host:port) and whether they are up, as it last saw them.
RELAYS = """
create table relays (
    owner text not null,
    relay text not null,
    up integer not null,
    since real not null,
    reason text not null,
    updated_at real not null,
    primary key (owner, relay)
)
"""

# The daemons' heartbeats, and when a chore shared by the daemons (retention) last ran, so
# that one daemon runs it.
DAEMONS_AND_CHORES = """
create table daemons (
    owner text primary key,
    started_at real not null,
    last_heartbeat real not null
);
create table chores (
    name text primary key,
    last_run real not null,
    run_by text not null
);
"""

SCHEMA = (
    RELAYS
    + """;
create table requests (
    id text primary key,
    idempotency_key text unique,
    template text not null,
    request blob not null,              -- the wire-form JSON, as checked at intake
    state text not null,
    priority integer not null,
    created_at real not null,
    send_at real,                       -- as the request asked: retry.max_age counts from here
    next_attempt_at real not null,
    attempts integer not null default 0,
    recipients text,                    -- JSON list still to deliver, null until rendered
    delivered text not null default '[]',
    refused text not null default '{}', -- JSON {recipient: reply} of permanent refusals
    last_reply text,
    maybe_duplicate integer not null default 0,
    updated_at real not null,
    claimed_by text,                    -- the daemon instance working on it, if any
    lease_until real                    -- its claim lapses then unless renewed
);
create index requests_due on requests (state, priority, next_attempt_at);
create index requests_claims on requests (claimed_by) where claimed_by is not null;
-- Rendered once, written once: every retry sends these bytes. Kept apart from `requests` so
-- the frequent state updates there do not rewrite a message-sized row each time.
create table messages (
    request_id text primary key references requests (id) on delete cascade,
    message_id text not null,
    envelope_from text not null,
    data blob not null
);
create table attempts (
    request_id text not null references requests (id) on delete cascade,
    number integer not null,
    started_at real not null,
    finished_at real,
    outcome text,
    code integer,
    reply text,
    primary key (request_id, number)
);
create table rejected (
    id integer primary key,
    received_at real not null,
    reason text not null,
    excerpt blob not null               -- the first bytes of the frame, for the operator
);
"""
    + DAEMONS_AND_CHORES
)


def _claims_and_send_at(db: sqlite3.Connection) -> None:
    """Version 1: claims recorded in the store, and `send_at` kept for `retry.max_age`."""
    db.execute("alter table requests add column send_at real")
    db.execute("alter table requests add column claimed_by text")
    db.execute("alter table requests add column lease_until real")
    db.execute("create index requests_claims on requests (claimed_by) where claimed_by is not null")
    scheduled = db.execute(
        "select id, request from requests where request like '%\"send_at\"%'"
    ).fetchall()
    for request_id, request in scheduled:
        send_at = orjson.loads(request).get("send_at")
        if send_at:
            db.execute(
                "update requests set send_at = ? where id = ?",
                (datetime.fromisoformat(send_at).timestamp(), request_id),
            )


def _relays(db: sqlite3.Connection) -> None:
    """Version 2: each daemon's relays and whether they are up, for `dispatcher status`."""
    db.execute(RELAYS)


def _daemons_and_chores(db: sqlite3.Connection) -> None:
    """Version 3: the daemons' heartbeats, and the chores one daemon does for all."""
    _execute_all(db, DAEMONS_AND_CHORES)


# Step n takes a spool from version n - 1 to n. Append; never edit a step that has shipped.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _claims_and_send_at,
    _relays,
    _daemons_and_chores,
]
VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Bring the spool to VERSION inside the caller's write transaction; returns the version
    it had (-1 for a new spool). Raises ValueError for a spool newer than this code."""
    (found,) = db.execute("pragma user_version").fetchone()
    (tables,) = db.execute("select count(*) from sqlite_master where name = 'requests'").fetchone()
    if not tables:
        _create(db)
        found = -1
    elif found > VERSION:
        raise ValueError(
            f"schema version {found} was written by a newer dispatcher (this one knows {VERSION})"
        )
    else:
        for step in MIGRATIONS[found:]:
            step(db)
    if found != VERSION:  # an up-to-date spool is not written: a daemon starts on a full disk
        db.execute(f"pragma user_version = {VERSION}")
    return int(found)


def _create(db: sqlite3.Connection) -> None:
    _execute_all(db, SCHEMA)


def _execute_all(db: sqlite3.Connection, script: str) -> None:
    """Run each statement of `script`: executescript would commit the caller's transaction
    first (no comment in a script here holds a semicolon)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)
