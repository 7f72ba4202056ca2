"""SQL that both stores run as it is: SQLite and PostgreSQL share these columns and the upsert
syntax. The placeholders are SQLite's `?`; the PostgreSQL store turns them into `%s`."""

# What a store selects to make a `Row` (`row_of`), in this order, in every store's dialect.
ROW_COLUMNS = (
    "id, template, request, created_at, attempts, envelope_from, recipients, delivered,"
    " refused, data, message_id, priority, next_attempt_at, send_at"
)
INSPECTED_COLUMNS = (
    "id, state, template, priority, created_at, updated_at, next_attempt_at,"
    " attempts, recipients, delivered, refused, last_reply, maybe_duplicate, request,"
    " message_id, envelope_from, data as message"
)
RELAY_COLUMNS = "owner, relay, up, since, reason, updated_at"  # what `relay_states` reads
ATTEMPT_COLUMNS = ("number", "started_at", "finished_at", "outcome", "code", "reply")
# A heartbeat: (owner, started_at, beat, starting).
HEARTBEAT = (
    "insert into daemons (owner, started_at, last_heartbeat) values (?, ?, ?)"
    " on conflict (owner) do update set last_heartbeat = excluded.last_heartbeat,"
    " started_at = case when ? then excluded.started_at else daemons.started_at end"
)
# A chore is this daemon's when nobody ran it within `every` seconds: (name, now, owner, every);
# returns a row only then. The conflict's row lock makes two daemons' tries take turns.
CHORE = (
    "insert into chores (name, last_run, run_by) values (?, ?, ?)"
    " on conflict (name) do update set last_run = excluded.last_run, run_by = excluded.run_by"
    " where chores.last_run <= excluded.last_run - ? returning name"
)
# Ends the claims on requests not begun: the store's own condition (in its placeholders)
# follows the `and`.
UNCLAIM_WAITING = (
    "update requests set claimed_by = null, lease_until = null"
    " where claimed_by is not null and state in ('queued', 'retry') and "
)
