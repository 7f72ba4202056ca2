"""Rate limits: how fast mail goes to a relay (`smtp.rate`) and to a recipient domain
(`limits.domains`), and slowing down when a relay says we go too fast.

Both limits space sends by at least 1/rate (a token bucket that holds one token), so over any
stretch of time no more than `rate` a second go out, bursts included: a provider that allows
14 a second (Amazon SES) never sees 15 in one second. Each daemon keeps its own budget.
"""

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping

import orjson

from dispatcher.settings import DomainLimit
from dispatcher.spool import Row

# Replies that mean "you are sending too fast" rather than "not this message": the codes a
# relay defers with (SES answers 454 "Throttling failure"), and its enhanced code 4.7.x or words.
THROTTLE_CODES = frozenset({421, 451, 454})
_THROTTLE_TEXT = re.compile(r"\b4\.7\.\d{1,3}\b|rate|too many|throttl", re.IGNORECASE)
SLOWDOWN = 60.0  # seconds a relay stays slowed after it last said we go too fast
MIN_RATE = 0.1  # messages per second: halving never goes below this
HALVE_EVERY = 1.0  # seconds: every connection hears "too fast" at once; that is one halving
OBSERVED_WINDOW = 5.0  # seconds of sends that give an unlimited relay's rate when it is halved
OBSERVED_SPAN = 1.0  # seconds: the shortest stretch a rate is measured over
BUSY_HOLD = 0.05  # seconds a row waits when its domain has every allowed connection busy


def is_throttle(code: int | None, reply: str) -> bool:
    """Whether a reply says the sender is going too fast (421/451/454 with 4.7.x, or the
    words rate, too many, throttl...)."""
    return code in THROTTLE_CODES and _THROTTLE_TEXT.search(reply) is not None


class Pace:
    """One relay's rate over all its connections: sends spaced by at least 1/rate.

    Unset (`rate=None`) means no limit until the relay throttles us; then, and for SLOWDOWN
    seconds after the last such reply, the rate is half what it was (or half what was
    observed), again at each further throttle.
    """

    def __init__(self, rate: float | None) -> None:
        self.configured = rate
        self.rate = rate  # in force now; None: no limit
        self.next_slot = 0.0  # monotonic time the next send may go
        self.slowed_until = 0.0
        self.halved_at = -HALVE_EVERY
        self.sent: deque[float] = deque(maxlen=1000)  # recent send times, for `observed()`

    def reserve(self, now: float) -> float:
        """Take the next slot; returns how long to wait before sending in it."""
        if self.slowed_until and now >= self.slowed_until:
            self.rate, self.slowed_until = self.configured, 0.0
        if self.rate is None:
            self.sent.append(now)
            return 0.0
        slot = max(now, self.next_slot)
        self.next_slot = slot + 1.0 / self.rate
        self.sent.append(slot)
        return slot - now

    async def wait(self, halt: asyncio.Event) -> bool:
        """Wait for this send's slot (none while there is no limit); False when `halt` is set
        first: the daemon is stopping and the message is not to go."""
        delay = self.reserve(time.monotonic())
        if delay <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await halt.wait()
                return False
        return True

    def slow_down(self, now: float) -> float | None:
        """The relay said we go too fast: halve the rate; returns the new rate, or None when
        this reply belongs to a halving just made (it only extends the slowdown)."""
        self.slowed_until = now + SLOWDOWN
        if now - self.halved_at < HALVE_EVERY:
            return None
        current = self.rate if self.rate is not None else self.observed(now)
        self.rate = max(MIN_RATE, current / 2)
        self.halved_at = now
        return self.rate

    def observed(self, now: float) -> float:
        """Messages per second over the last OBSERVED_WINDOW seconds, or over the stretch the
        sends cover when they began later (a relay that throttles the first burst is halved
        from that burst's rate, not from the burst spread over the whole window)."""
        recent = [t for t in self.sent if t >= now - OBSERVED_WINDOW]
        if not recent:
            return 2 * MIN_RATE
        span = max(OBSERVED_SPAN, now - recent[0])
        return max(2 * MIN_RATE, len(recent) / span)


class DomainLimits:
    """The admission policy of `limits.domains`: per recipient domain, at most `rate` mails a
    second and `connections` sends in flight. A request to several domains goes only when
    each of its limited domains lets it (the strictest wins); other domains never wait."""

    def __init__(self, limits: Mapping[str, DomainLimit]) -> None:
        self.limits = limits
        self.next_slot: dict[str, float] = {}  # the time the domain's next mail may go
        self.promised: dict[str, float] = {}  # the latest time given to a held row
        self.in_flight: dict[str, set[str]] = {domain: set() for domain in limits}
        self.admitted: dict[str, list[str]] = {}  # request id -> its limited domains

    def closed_until(self, now: float) -> float | None:
        return None

    def admit(self, row: Row, now: float) -> float | None:
        domains = [d for d in recipient_domains(row) if d in self.limits]
        if not domains:
            return None
        later = max(self._free_at(domain, now) for domain in domains)
        if later > now:
            return self._promise(domains, later)
        for domain in domains:
            rate = self.limits[domain].rate
            if rate is not None:
                self.next_slot[domain] = max(now, self.next_slot.get(domain, now)) + 1.0 / rate
            self.in_flight[domain].add(row.id)
        self.admitted[row.id] = domains
        return None

    def finished(self, request_id: str) -> None:
        """An admitted request was sent, deferred or given back: its connection is free."""
        for domain in self.admitted.pop(request_id, ()):
            self.in_flight[domain].discard(request_id)

    def _free_at(self, domain: str, now: float) -> float:
        limit = self.limits[domain]
        if limit.connections is not None and len(self.in_flight[domain]) >= limit.connections:
            return now + BUSY_HOLD
        return self.next_slot.get(domain, now) if limit.rate is not None else now

    def _promise(self, domains: list[str], later: float) -> float:
        """Rows held for a rate come back one slot apart, not all at the next free slot."""
        for domain in domains:
            rate = self.limits[domain].rate
            if rate is not None:
                later = max(later, self.promised.get(domain, later))
        for domain in domains:
            rate = self.limits[domain].rate
            if rate is not None:
                self.promised[domain] = later + 1.0 / rate
        return later


def recipient_domains(row: Row) -> set[str]:
    """The domains a request goes to: of the recipients still to deliver once rendered, else
    of its `to`, `cc` and `bcc`."""
    if row.recipients is not None:
        return {_domain(address) for address in row.recipients}
    fields = orjson.loads(row.request)
    return {_domain(a) for key in ("to", "cc", "bcc") for a in _listed(fields.get(key))}


def _listed(value: object) -> Iterable[str]:
    if isinstance(value, str):
        return (value,)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else ()


def _domain(address: str) -> str:
    """`b.org` of `a@b.org` and of `Ada <a@b.org>`."""
    return address.rpartition("@")[2].strip().rstrip(">").strip().lower()
