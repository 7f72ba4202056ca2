"""The admission seam: which claimed requests may go now, and that nothing else is rendered."""

import asyncio
from pathlib import Path

from dispatcher import wire
from dispatcher.admission import Admission, Schedule
from dispatcher.delivery import Delivery
from dispatcher.observer import Observer
from dispatcher.renderpool import RenderPool
from dispatcher.settings import Settings, SmtpSettings, SpoolSettings
from dispatcher.spool import Incoming, Row, now
from dispatcher.spool.sqlite import SqliteSpool

ROOT = Path(__file__).parents[1]


def row(request_id: str, priority: int = 1, due: float = 0.0) -> Row:
    return Row(request_id, "welcome", b"{}", 0.0, 0, None, None, [], {}, None, None, priority, due)


class Closed:
    """A policy that lets nothing go until `until` (as a relay that is down would)."""

    def __init__(self, until: float) -> None:
        self.until = until

    def closed_until(self, now: float) -> float | None:
        return self.until if now < self.until else None

    def admit(self, row: Row, now: float) -> float | None:
        return None


class EveryOther:
    """A policy that holds back every second row it is asked about (as a rate limit would)."""

    def __init__(self) -> None:
        self.asked = 0

    def closed_until(self, now: float) -> float | None:
        return None

    def admit(self, row: Row, now: float) -> float | None:
        self.asked += 1
        return None if self.asked % 2 else now + 30


def test_high_priority_goes_first_and_nothing_goes_before_it_is_due() -> None:
    admission = Admission([Schedule()])
    go, held = admission.admit([row("low", 2), row("later", 0, due=50.0), row("high", 0)], 10.0)
    assert [r.id for r in go] == ["high", "low"]
    assert [(r.id, when) for r, when in held] == [("later", 50.0)]


def test_a_row_goes_only_when_every_policy_admits_it() -> None:
    admission = Admission([Schedule(), EveryOther(), Closed(until=5.0)])
    assert admission.closed_until(1.0) == 5.0 and admission.closed_until(5.0) is None
    go, held = admission.admit([row("a"), row("b"), row("c")], 6.0)
    assert [r.id for r in go] == ["a", "c"] and [r.id for r, _ in held] == ["b"]


def delivery(tmp_path: Path, *policies: object) -> tuple[Delivery, SqliteSpool]:
    settings = Settings(spool=SpoolSettings(path=tmp_path / "s.db"), smtp=SmtpSettings(port=1))
    spool = SqliteSpool(settings.spool.path, "test")
    renders = RenderPool(ROOT / "templates", "n@example.com", 0)
    admission = Admission(policies)  # type: ignore[arg-type]
    return Delivery(settings, spool, renders, Observer(settings, spool), admission), spool


def add(spool: SqliteSpool, *ids: str, at: float | None = None) -> None:
    spool.add(
        [Incoming.of(wire.validate({"v": 1, "id": i, "template": "welcome", "to": "a@x.org",
                                    "context": {"name": "A", "activate_url": "u"}}))
         for i in ids],
        [],
        now() if at is None else at,  # a real clock: `retry.max_age` counts from here
    )  # fmt: skip


def test_a_held_back_row_is_given_back_unrendered_and_due_when_the_policy_says(
    tmp_path: Path,
) -> None:
    feeder, spool = delivery(tmp_path, EveryOther())
    add(spool, "a", "b")
    assert asyncio.run(feeder.feed_once()) == (2, None)
    queue = feeder.relays.all[0].queue
    assert [queue.get_nowait().id] == ["a"] and queue.empty()
    assert spool.inspect("b")["state"] == "queued"  # type: ignore[index]
    assert spool.inspect("b")["message"] is None  # type: ignore[index]  (never rendered)
    assert spool.inspect("b")["next_attempt_at"] > 25  # type: ignore[index]
    assert spool.inspect("a")["message"] is not None  # type: ignore[index]
    spool.close()


def test_while_a_policy_is_closed_nothing_is_claimed(tmp_path: Path) -> None:
    feeder, spool = delivery(tmp_path, Closed(until=1e12))
    add(spool, "a")
    assert asyncio.run(feeder.feed_once()) == (0, 1e12)
    assert spool.inspect("a")["state"] == "queued" and not feeder.held  # type: ignore[index]
    assert spool.claim(now(), 10)[0].id == "a"  # never claimed by the feeder
    spool.close()


def test_while_closed_a_request_past_max_age_is_dead_and_the_others_wait(tmp_path: Path) -> None:
    feeder, spool = delivery(tmp_path, Closed(until=1e12))
    add(spool, "old", at=now() - feeder.settings.retry.max_age - 1)
    add(spool, "new")
    assert asyncio.run(feeder.feed_once()) == (0, 1e12)
    feeder.journal.flush()
    assert spool.inspect("old")["state"] == "dead"  # type: ignore[index]
    assert spool.inspect("new")["state"] == "queued" and not feeder.held  # type: ignore[index]
    spool.close()
