"""How long to wait before trying a temporarily failed delivery again."""

import random

# Past this many doublings every realistic `first` has long passed `longest`; stopping here keeps
# `2.0 ** n` finite for an attempt counter that has grown without bound.
_MAX_DOUBLINGS = 1000


def retry_delay(
    attempt: int, first: float, longest: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    The delay doubles with each attempt, `first * 2 ** (attempt - 1)`, and stops growing at
    `longest`. It is then multiplied by a random factor in [0.8, 1.2] and clamped into
    [first, longest]. The jitter matters after an outage: every message deferred while the mail
    server was down would otherwise come due at the same instant and hit the recovering server
    as one thundering herd; spread out, they arrive as a manageable stream.

    `rng` makes the jitter reproducible in tests; by default the module-level generator is used.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, got {attempt}")
    if not 0 < first <= longest:
        raise ValueError(f"need 0 < first <= longest, got first={first}, longest={longest}")
    base = min(longest, first * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
    uniform = rng.uniform if rng is not None else random.uniform
    jitter = uniform(0.8, 1.2)
    return min(longest, max(first, base * jitter))
