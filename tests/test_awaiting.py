"""The requests a client awaits receipts for: spill files counted right, and nothing the garbage
collector counts per request."""

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.awaiting import Awaiting


def test_a_spill_file_can_go_only_once_its_last_request_is_acknowledged() -> None:
    awaiting, spill = Awaiting(), Path("spill-1")
    awaiting.add("a", b"A", 1.0, source=spill)
    awaiting.add("b", b"B", 1.0, source=spill)
    assert awaiting.acknowledge("a") is None
    assert awaiting.acknowledge("a") is None  # a second receipt changes nothing
    assert awaiting.acknowledge("b") == spill
    assert len(awaiting) == 0 and awaiting.files == {}


def test_a_spill_file_abandoned_at_its_timeout_is_never_given_up_by_late_receipts() -> None:
    """Its requests were not all acknowledged: the file must stay, to be handed over again."""
    awaiting, spill = Awaiting(), Path("spill-1")
    for request_id in ("a", "b", "c"):
        awaiting.add(request_id, b"x", 1.0, source=spill)
    awaiting.abandon(spill)
    assert [awaiting.acknowledge(request_id) for request_id in ("a", "b", "c")] == [None] * 3
    assert len(awaiting) == 0 and awaiting.files == {}


def test_late_requests_come_oldest_first_and_a_second_send_is_remembered() -> None:
    awaiting = Awaiting()
    awaiting.add("old", b"O", 1.0)
    awaiting.add("young", b"Y", 5.0)
    assert awaiting.late(now=11.0, timeout=10.0) == ["old"]
    assert awaiting.remove("old") == (b"O", False)
    awaiting.add("old", b"O", 11.0, resent=True)
    assert awaiting.late(now=30.0, timeout=10.0) == ["young", "old"]
    assert awaiting.remove("old") == (b"O", True)


def test_own_requests_are_those_not_read_back_from_a_spill_file() -> None:
    awaiting = Awaiting()
    awaiting.add("mine", b"M", 1.0)
    awaiting.add("filed", b"F", 1.0, source=Path("spill-1"))
    assert awaiting.own() == 1
    assert awaiting.take_own() == [b"M"]
    assert awaiting.own() == 0 and len(awaiting) == 1


@pytest.fixture
def collections_run() -> Iterator[list[int]]:
    """The generations of the garbage collections that run while the test does."""
    generations: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.collect()
    gc.callbacks.append(record)
    try:
        yield generations
    finally:
        gc.callbacks.remove(record)


def test_awaiting_many_requests_triggers_no_garbage_collection(
    collections_run: list[int],
) -> None:
    """A tuple per request made the caller pay for a collection every ~700 calls, and a full
    one (tens of milliseconds) now and then, while receipts were on their way."""
    ids = [f"client-{n}" for n in range(20_000)]
    frames = [request_id.encode() for request_id in ids]
    awaiting = Awaiting()
    for request_id, frame in zip(ids, frames, strict=True):
        awaiting.add(request_id, frame, 1.0)
    assert collections_run == []
    assert all(awaiting.acknowledge(request_id) is None for request_id in ids)
    assert len(awaiting) == 0


def test_a_request_read_twice_from_its_spill_file_counts_once() -> None:
    awaiting, spill = Awaiting(), Path("spill-1")
    awaiting.add("a", b"A", 1.0, source=spill)
    awaiting.add("a", b"A", 2.0, source=spill)  # the same id twice in a damaged file
    assert awaiting.acknowledge("a") == spill


def test_late_requests_are_given_back_and_a_late_spill_file_is_abandoned_whole() -> None:
    awaiting, spill = Awaiting(), Path("spill-1")
    awaiting.add("filed-1", b"F1", 1.0, source=spill)
    awaiting.add("mine", b"M", 2.0, resent=True)
    awaiting.add("filed-2", b"F2", 20.0, source=spill)  # not late itself: goes with its file
    awaiting.add("young", b"Y", 20.0)
    own, files = awaiting.take_late(now=12.0, timeout=10.0)
    assert own == [("mine", b"M", True)] and files == {spill}
    assert len(awaiting) == 1 and awaiting.files == {}
