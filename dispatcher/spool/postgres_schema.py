"""The PostgreSQL spool's schema: versioned steps in the `dispatcher` schema, migrated at start.

Every daemon migrates when it starts, inside one transaction that first takes an advisory
lock: two daemons starting together take turns, and the second finds the work done.
"""

from typing import Any

SCHEMA_NAME = "dispatcher"  # every table lives here, apart from an application's own
MIGRATION_LOCK = 0x6D61696C_71756575  # pg_advisory_xact_lock key: "mailqueu"

# Version 1. Times are Unix seconds, as the daemon's clock gives them (as in the SQLite spool);
# JSON lists and maps are text, so both stores hand the same values to `row_of`.
VERSION_1 = """
create table requests (
    id text primary key,
    idempotency_key text unique,
    template text not null,
    request bytea not null,
    state text not null,
    priority integer not null,
    created_at double precision not null,
    send_at double precision,
    next_attempt_at double precision not null,
    attempts integer not null default 0,
    recipients text,
    delivered text not null default '[]',
    refused text not null default '{}',
    last_reply text,
    maybe_duplicate boolean not null default false,
    updated_at double precision not null,
    claimed_by text,
    lease_until double precision
) with (fillfactor = 80);
-- The rows not yet sent or dead, in the order claims take them: sent and dead rows cost it
-- nothing. No index holds `claimed_by` or `lease_until`, and the pages keep room (the fill
-- factor), so a claim or a renewal rewrites the row in place (a HOT update), no index.
create index requests_due on requests (priority, next_attempt_at)
    where state in ('queued', 'retry', 'sending');
create index requests_done on requests (state, updated_at) where state in ('sent', 'dead');
create table messages (
    request_id text primary key references requests (id) on delete cascade,
    message_id text not null,
    envelope_from text not null,
    data bytea not null
);
-- Stored as sent, not compressed: pglz took milliseconds per batch of the delivery loop.
alter table messages alter column data set storage external;
create table attempts (
    request_id text not null references requests (id) on delete cascade,
    number integer not null,
    started_at double precision not null,
    finished_at double precision,
    outcome text,
    code integer,
    reply text,
    primary key (request_id, number)
);
create table rejected (
    id bigint generated always as identity primary key,
    received_at double precision not null,
    reason text not null,
    excerpt bytea not null
);
create table daemons (
    owner text primary key,
    started_at double precision not null,
    last_heartbeat double precision not null
);
create table chores (
    name text primary key,
    last_run double precision not null,
    run_by text not null
);
-- Each daemon's relays, in the order it uses them, as it last saw them (`dispatcher status`).
create table relays (
    owner text not null,
    relay text not null,
    position integer not null,
    up boolean not null,
    since double precision not null,
    reason text not null,
    updated_at double precision not null,
    primary key (owner, relay)
)
"""

# Step n takes the schema from version n - 1 to n (0: an empty database). Append; never edit
# a step that has shipped.
MIGRATIONS = [VERSION_1]
VERSION = len(MIGRATIONS)


def migrate(cursor: Any) -> int:
    """Bring the schema to VERSION inside the caller's transaction; returns the version it had.
    Raises ValueError for a schema newer than this code."""
    cursor.execute("select pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    cursor.execute(f"create schema if not exists {SCHEMA_NAME}")
    cursor.execute(f"set local search_path to {SCHEMA_NAME}")
    cursor.execute("create table if not exists schema_version (version integer not null)")
    found = version(cursor)
    if found is None:
        cursor.execute("insert into schema_version values (0)")
        found = 0
    if found > VERSION:
        raise ValueError(
            f"schema version {found} was written by a newer dispatcher (this one knows {VERSION})"
        )
    for step in MIGRATIONS[found:]:
        for statement in step.split(";"):  # no comment in a step holds a semicolon
            cursor.execute(statement)
    cursor.execute("update schema_version set version = %s", (VERSION,))
    return found


def version(cursor: Any) -> int | None:
    """The schema's version, or None where no daemon has created it."""
    cursor.execute("select to_regclass(%s)", (f"{SCHEMA_NAME}.schema_version",))
    (table,) = cursor.fetchone()
    if table is None:
        return None
    cursor.execute(f"select version from {SCHEMA_NAME}.schema_version")
    found = cursor.fetchone()
    return None if found is None else int(found[0])
