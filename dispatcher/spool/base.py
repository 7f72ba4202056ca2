"""What a store must do to be the daemon's spool: the contract every implementation keeps.

A daemon instance (its `owner` name) claims due requests in the store itself, with a lease
that it renews while it works, so two daemons on one store never send the same request and
a daemon that dies leaves nothing stranded: its claims lapse and are taken again.
"""

from collections.abc import Sequence
from typing import Any, Protocol

from dispatcher.spool.records import Finish, Incoming, RelayState, Row, Start


class Reader(Protocol):
    """Read-only queries for status, inspect, metrics and the preview; never takes a write lock."""

    def counts(self) -> dict[str, int]:
        """Requests per state, plus rejected frames; every state is present, zero or not."""
        ...

    def waiting(self) -> int:
        """How many requests are not yet sent or dead."""
        ...

    def waiting_ids(self) -> list[str]:
        """Ids of the requests not yet sent or dead."""
        ...

    def oldest_waiting(self) -> float | None:
        """Creation time of the oldest request not yet sent or dead."""
        ...

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest dead requests and rejected frames: `at`, `state`, `id`, `template`,
        `reason`."""
        ...

    def tag_counts(self, tag: str, templates: Sequence[str] = ()) -> dict[str, int]:
        """Requests per state (every state present) that carry `tag` in their own `tags`, or
        are of one of `templates` (those whose template.yaml gives the tag)."""
        ...

    def failures_mark(self) -> str:
        """A token that changes whenever a request dies or a frame is rejected."""
        ...

    def inspect(self, request_id: str) -> dict[str, Any] | None:
        """Everything the store holds about one request, or None if it holds nothing."""
        ...

    def relays(self) -> list[dict[str, Any]]:
        """Each relay as each daemon last recorded it: `daemon`, `relay` (host:port), `state`
        (up or down), `since`, `reason`, `updated_at`."""
        ...

    def write_problem(self) -> str | None:
        """What would make the daemon's writes fail now (a full disk), as far as a reader can
        tell; None when it sees nothing wrong."""
        ...

    def daemons(self) -> list[dict[str, Any]]:
        """Every daemon that beat on this store: `owner`, `started_at`, `last_heartbeat`,
        the most recently seen first."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> "Reader": ...

    def __exit__(self, *exc: object) -> None: ...


class Spool(Reader, Protocol):
    """The daemon's read-write view: intake, claims, delivery bookkeeping and administration."""

    owner: str  # the daemon instance whose claims this view makes

    def __enter__(self) -> "Spool": ...

    # -- intake --

    def add(
        self, requests: Sequence[Incoming], rejections: Sequence[tuple[str, bytes]], now: float
    ) -> list[str]:
        """Store a batch durably in one transaction; returns the ids that were new.

        An id or idempotency key already held is ignored, so a re-sent request is stored once.
        A receipt may be published for a request only after this returns.
        """
        ...

    # -- claims --

    def claim(self, now: float, limit: int) -> list[Row]:
        """Atomically take up to `limit` due, unclaimed requests for `owner`, most urgent first."""
        ...

    def next_due_at(self) -> float | None:
        """When the earliest waiting request becomes due, or None when nothing waits."""
        ...

    def renew(self, now: float) -> int:
        """Extend this owner's leases, and free what owners whose leases lapsed left behind
        (a send they began goes again, flagged as a possible duplicate); returns how many were
        freed."""
        ...

    def heartbeat(self, now: float, *, starting: bool = False) -> None:
        """Record that `owner` is alive at `now` (`starting`: and that its life began then),
        for `Reader.daemons`; the daemon beats as often as it renews its leases."""
        ...

    def due(self, chore: str, every: float, now: float) -> bool:
        """Whether this daemon should do `chore` (a retention pass) now: true for one daemon,
        then for none until `every` seconds later, however many daemons share the store."""
        ...

    def recover(self, now: float) -> int:
        """At start: free every claim of this owner's earlier life and every lapsed one;
        returns how many sends were cut short (they go again as possible duplicates)."""
        ...

    def release(self, request_ids: Sequence[str], not_before: float | None = None) -> None:
        """Give claimed requests back unsent, as they were (an attempt begun but not sent is
        undone); with `not_before`, none is due before that time."""
        ...

    # -- delivery bookkeeping --

    def record(self, starts: Sequence[Start], finishes: Sequence[Finish]) -> None:
        """Attempts begun and ended, of many requests, in one transaction (a group commit).

        A start marks the request as in flight before the first byte goes to the server,
        keeping its rendered bytes on the first attempt. A finish records the end of an
        attempt (or a render failure), the new state, and ends the claim. Need not be fsynced:
        at worst a crash sends a message again.
        """
        ...

    def set_relays(self, states: Sequence[RelayState], now: float) -> None:
        """Replace this owner's record of its relays' states (for `dispatcher status`)."""
        ...

    # -- administration --

    def retry(self, request_ids: Sequence[str] | None, now: float) -> list[str]:
        """Make requests due now: the given ones if they wait or are dead, else every dead
        one; returns the ids that were re-queued."""
        ...

    def purge(
        self, state: str, older_than: float | None, now: float, *, limit: int | None = None
    ) -> int:
        """Delete sent or dead requests that reached that state `older_than` seconds ago or
        more (None: all); returns how many."""
        ...
