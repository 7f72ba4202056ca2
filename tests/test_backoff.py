"""retry_delay(): doubling from `first`, capped at `longest`, jittered, never out of bounds."""

import random

import pytest

from dispatcher.backoff import retry_delay

FIRST, LONGEST = 30.0, 3600.0


class NoJitter(random.Random):
    """Always draws the middle of the range, so the exponential shape shows exactly."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def test_delay_doubles_with_each_attempt() -> None:
    delays = [retry_delay(n, FIRST, LONGEST, NoJitter()) for n in range(1, 6)]

    assert delays == pytest.approx([30, 60, 120, 240, 480])


def test_delay_stops_growing_at_longest() -> None:
    assert retry_delay(8, FIRST, LONGEST, NoJitter()) == LONGEST  # 30 * 2**7 = 3840
    assert retry_delay(50, FIRST, LONGEST, NoJitter()) == LONGEST


def test_an_absurd_attempt_number_neither_overflows_nor_exceeds_longest() -> None:
    assert retry_delay(100_000, FIRST, LONGEST, random.Random(1)) <= LONGEST


def test_delay_stays_within_first_and_longest_and_jitter_band_over_many_draws() -> None:
    rng = random.Random(20240601)
    for attempt in range(1, 16):
        base = min(LONGEST, FIRST * 2 ** (attempt - 1))
        for _ in range(500):
            delay = retry_delay(attempt, FIRST, LONGEST, rng)
            assert FIRST <= delay <= LONGEST
            assert 0.8 * base <= delay <= 1.2 * base


def test_jitter_spreads_retries_that_are_due_together() -> None:
    rng = random.Random(7)

    delays = {retry_delay(3, FIRST, LONGEST, rng) for _ in range(100)}

    assert len(delays) > 90
    assert max(delays) - min(delays) > 0.2 * 120  # 120 s +- 20 %: a real spread, not noise


def test_without_rng_the_module_generator_is_used() -> None:
    assert FIRST <= retry_delay(2, FIRST, LONGEST) <= 1.2 * 2 * FIRST


@pytest.mark.parametrize(
    ("attempt", "first", "longest"),
    [(0, 30, 3600), (1, 0, 3600), (1, -1, 3600), (1, 60, 30)],
)
def test_nonsense_arguments_are_rejected(attempt: int, first: float, longest: float) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt, first, longest)
