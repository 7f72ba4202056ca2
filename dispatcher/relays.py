"""Relay health and failover: which relay mail goes to, and what happens when one fails.

A failure of the session, not of one message (connect, TLS, EHLO or login failing, a 421),
marks the relay **down**: its rows go back to the spool with no attempt used, and mail goes
through the next relay that is up (`smtp.fallback`, in order). While every relay is down the
feeder claims nothing (`closed_until`), and one probe at a time opens a session to each relay
that is down, the delay doubling between the bounds of its `probe` setting. A probe that gets
through marks the relay up again and wakes the feeder, which drains the queue at full speed.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

from dispatcher.admin import duration
from dispatcher.backoff import retry_delay
from dispatcher.observer import Observer
from dispatcher.rates import Pace, is_throttle
from dispatcher.settings import RelaySettings, Settings
from dispatcher.spool import RelayState, Row, Spool, now
from dispatcher.transport import Attempt, SmtpConnection

log = logging.getLogger(__name__)


class Relay:
    """One relay: its settings, the rows queued for its connections, its pace and health."""

    def __init__(self, settings: RelaySettings, queue_size: int) -> None:
        self.settings = settings
        self.name = settings.name
        self.queue: asyncio.Queue[Row] = asyncio.Queue(maxsize=queue_size)
        self.pace = Pace(settings.rate)
        self.up = True
        self.since = now()  # when it last went down or came up
        self.reason = ""  # why it is down (the server's reply, never the password)
        self.probes = 0  # failed probes since it went down
        self.probe_at = 0.0  # while down: when the next probe goes

    def state(self) -> RelayState:
        return RelayState(self.name, self.up, self.since, self.reason)


class Relays:
    """The relays in order of preference; also the admission policy that stops all claims
    while every relay is down (until the next probe)."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        observer: Observer,
        wake: Callable[[], None],
        queue_size: int,
    ) -> None:
        self.all = [Relay(relay, queue_size) for relay in settings.smtp.relays]
        self.spool = spool
        self.observer = observer
        self.wake = wake  # the feeder's: a relay came back
        self.changed = asyncio.Event()  # a relay went down: the prober looks again

    def active(self) -> Relay | None:
        """The first relay that is up: where new mail goes."""
        return next((relay for relay in self.all if relay.up), None)

    # -- the admission policy ----------------------------------------------------------

    def closed_until(self, at: float) -> float | None:
        if any(relay.up for relay in self.all):
            return None
        return min(relay.probe_at for relay in self.all)

    def admit(self, row: Row, at: float) -> float | None:
        return None

    # -- what a send tells about its relay ---------------------------------------------

    def judge(self, relay: Relay, attempt: Attempt) -> bool:
        """Learn from an attempt: True when it is the message's own (its outcome is decided as
        usual), False when the relay failed and the message goes back unsent."""
        if is_throttle(attempt.code, attempt.reply):
            self.throttled(relay, attempt.reply)
            return not attempt.session_failed
        if attempt.session_failed:
            self.went_down(relay, attempt.reply)
            return False
        return True

    def throttled(self, relay: Relay, reply: str) -> None:
        rate = relay.pace.slow_down(asyncio.get_running_loop().time())
        if rate is not None:
            log.warning(
                "relay %s says we send too fast (%s): slowing to %.3g messages/s for a while",
                relay.name,
                reply,
                rate,
            )

    def went_down(self, relay: Relay, reason: str) -> None:
        if not relay.up:
            return
        relay.up, relay.since, relay.reason, relay.probes = False, now(), reason, 0
        relay.probe_at = relay.since + retry_delay(1, *relay.settings.probe)
        active = self.active()
        then = (
            f"sending through {active.name}"
            if active is not None
            else f"next probe in {relay.probe_at - relay.since:.1f} s"
        )
        log.warning(
            "relay %s down: %s; %s waiting; %s", relay.name, reason, self.observer.waiting(), then
        )
        self.publish(relay)
        self.changed.set()

    def came_up(self, relay: Relay) -> None:
        down_for = now() - relay.since
        relay.up, relay.since, relay.reason = True, now(), ""
        returns = " (new mail goes through it again)" if self.active() is relay else ""
        log.info(
            "relay %s up again after %s down; %s waiting%s",
            relay.name,
            duration(down_for),
            self.observer.waiting(),
            returns,
        )
        self.publish(relay)
        self.wake()

    def publish(self, relay: Relay | None = None) -> None:
        """Record the relays' states for `dispatcher status` and the metrics."""
        for each in self.all if relay is None else [relay]:
            self.observer.relay(each.name, each.up)
        try:
            self.spool.set_relays([each.state() for each in self.all], now())
        except Exception as exc:  # status would be stale; delivery goes on
            log.error("cannot record the relays' states in the spool: %s", exc)

    # -- the prober --------------------------------------------------------------------

    async def probe(self) -> None:
        """One probe at a time: at each down relay's time, open a session (TLS, EHLO,
        login) and close it, sending nothing."""
        self.publish()
        while True:
            self.changed.clear()
            down = [relay for relay in self.all if not relay.up]
            wait = min((r.probe_at for r in down), default=None)
            if wait is None or wait > now():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if wait is None else wait - now()):
                        await self.changed.wait()
                continue
            relay = min(down, key=lambda r: r.probe_at)
            async with SmtpConnection(relay.settings) as connection:
                _, failure = await connection.check()
            if failure is None:
                self.came_up(relay)
                continue
            relay.probes += 1
            if failure != relay.reason:  # e.g. refused now, after a 421 at first
                relay.reason = failure
                self.publish(relay)
            relay.probe_at = now() + retry_delay(relay.probes + 1, *relay.settings.probe)
            log.debug("relay %s still down: %s", relay.name, failure)
