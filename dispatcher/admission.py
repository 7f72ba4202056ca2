"""Which claimed requests may go now: the policies between the spool and the render workers.

The feeder asks before it claims (`closed_until`: a policy can stop all sending, as a relay
that is down will) and for each claimed row (`admit`: a rate limit, a schedule). A row held
back goes back to the spool, due again when its policy says; nothing is rendered for it. A new
policy is one class with these two methods, added in `policies()`.
"""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from dispatcher.settings import Settings
from dispatcher.spool import Row


class Policy(Protocol):
    """One rule about when mail may go."""

    def closed_until(self, now: float) -> float | None:
        """None while rows may go; else the time to ask again (nothing is claimed until then)."""
        ...

    def admit(self, row: Row, now: float) -> float | None:
        """None: `row` may go now, and counts as gone; else the earliest time it may go."""
        ...


@runtime_checkable
class Counting(Protocol):
    """A policy that counts the rows it admitted until they are done (connections per domain)."""

    def finished(self, request_id: str) -> None:
        """An admitted row was sent, deferred, made dead or given back unsent."""
        ...


class Schedule:
    """A request goes no earlier than it is due: its `send_at`, or its next retry."""

    def closed_until(self, now: float) -> float | None:
        return None

    def admit(self, row: Row, now: float) -> float | None:
        return row.due if row.due > now else None


def policies(settings: Settings) -> list[Policy]:
    """The policies the settings ask for, in the order they are asked (the relays' health is
    the delivery side's own, added there)."""
    if not settings.limits.domains:
        return [Schedule()]
    from dispatcher.rates import DomainLimits

    return [Schedule(), DomainLimits(settings.limits.domains)]


class Admission:
    """Applies the policies in turn: a row goes only when every one admits it."""

    def __init__(self, rules: Sequence[Policy]) -> None:
        self.rules = list(rules)
        self.counting = [rule for rule in self.rules if isinstance(rule, Counting)]

    def closed_until(self, now: float) -> float | None:
        """When every closed policy has opened again, or None while all are open."""
        times = [t for rule in self.rules if (t := rule.closed_until(now)) is not None]
        return max(times) if times else None

    def admit(self, rows: Sequence[Row], now: float) -> tuple[list[Row], list[tuple[Row, float]]]:
        """The rows that may go now, most urgent first (priority, then due time), and those
        held back, each with the time it may go."""
        go: list[Row] = []
        held: list[tuple[Row, float]] = []
        for row in sorted(rows, key=urgency):
            for rule in self.rules:
                later = rule.admit(row, now)
                if later is not None:
                    held.append((row, later))
                    break
            else:
                go.append(row)
        return go, held

    def finished(self, request_ids: Sequence[str]) -> None:
        """Rows admitted earlier are done: the policies that count them let others go."""
        for rule in self.counting:
            for request_id in request_ids:
                rule.finished(request_id)


def urgency(row: Row) -> tuple[int, float]:
    """Priority first ("high" is 0), then the longest waiting."""
    return row.priority, row.due
