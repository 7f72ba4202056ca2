"""What the daemon tells the outside world while it runs, besides its log lines.

The daemon calls one `Observer` at each event (received, sent, retry, dead, rejected) and at
each step of its life (ready, stopping). The observer passes that on to the service manager
(`notify`: READY, WATCHDOG, STATUS, STOPPING) and, when `metrics.bind` is set, to Prometheus
(`metrics`). Keeping this out of the service loop leaves the loop about delivery.
"""

import time
from collections import Counter
from typing import TYPE_CHECKING

from dispatcher.errors import StoreUnavailable
from dispatcher.notify import Notifier
from dispatcher.settings import Settings
from dispatcher.spool import Reader
from dispatcher.storehealth import StoreHealth
from dispatcher.transport import SmtpConnection

if TYPE_CHECKING:
    from dispatcher.metrics import Metrics


class Observer:
    """Counts events and reports them; every method is cheap and never raises for I/O."""

    def __init__(self, settings: Settings, spool: Reader) -> None:
        self.settings = settings
        self.spool = spool
        self.counts: Counter[str] = Counter()
        self.store = StoreHealth()  # told by every writer of the spool
        self.connections: list[SmtpConnection] = []
        self.relays_down: set[str] = set()  # host:port of each relay that is down now
        self.notifier = Notifier()
        self.metrics: Metrics | None = None
        if settings.metrics.bind is not None:
            from dispatcher import metrics  # prometheus-client only when asked for

            self.metrics = metrics.Metrics(
                settings.spool, self.open_connections, lambda: int(self.store.available)
            )
            for relay in settings.smtp.relays:  # every relay's series exists from the start
                self.metrics.relay_up.labels(relay.name).set(1)

    def open_connections(self) -> int:
        return sum(1 for connection in self.connections if connection.is_open)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Open the metrics endpoint, then tell the manager the daemon is ready.

        Called once the spool is open and the intake is bound, so a client connecting after
        READY=1 reaches a daemon that takes its requests.
        """
        address = self.settings.metrics.address()
        if self.metrics is not None and address is not None:
            self.metrics.serve(*address)
        self.notifier.ready(self.status())

    async def keep_alive(self) -> None:
        """The watchdog task: pings at half `WATCHDOG_USEC` from the event loop, until cancelled."""
        await self.notifier.keep_alive(self.status)

    def stopping(self) -> None:
        self.notifier.stopping(f"stopping; {self.status()}")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()

    def status(self) -> str:
        """One line for `systemctl status`: what waits, and what happened since start."""
        done = ", ".join(f"{self.counts[o]} {o}" for o in ("received", "sent", "retry", "dead"))
        rejected = self.counts["rejected"]
        waiting = self.waiting()
        down = "".join(f"; relay {name} down" for name in sorted(self.relays_down))
        status = f"{waiting} waiting; since start {done}, {rejected} rejected{down}"
        if self.store.available:
            return status
        outage = f"store unavailable for {self.store.unavailable_for():.0f} s: {self.store.reason}"
        return f"{outage}; {status}"

    def waiting(self) -> str:
        """How many requests wait, for a log or status line; "?" while the store cannot say
        (a store that is down: the line that reports the outage says why)."""
        try:
            return str(self.spool.waiting())
        except StoreUnavailable:
            return "?"

    # -- events ------------------------------------------------------------------------

    def watch(self, connection: SmtpConnection) -> None:
        """Count this worker's SMTP connection in `dispatcher_smtp_connections`."""
        self.connections.append(connection)

    def relay(self, name: str, up: bool) -> None:
        """Relay `name` (host:port) went down or came back (`dispatcher_relay_up`)."""
        (self.relays_down.discard if up else self.relays_down.add)(name)
        if self.metrics is not None:
            self.metrics.relay_up.labels(name).set(1 if up else 0)

    def count(self, **outcomes: int) -> None:
        """`received=n`, `rejected=n`, ...: requests (or frames) that had this outcome."""
        self.counts.update(outcomes)
        if self.metrics is not None:
            for outcome, n in outcomes.items():
                if n:
                    self.metrics.messages.labels(outcome).inc(n)

    def attempted(self, seconds: float) -> None:
        """One SMTP delivery attempt took `seconds`, whatever came of it."""
        if self.metrics is not None:
            self.metrics.send_seconds.observe(seconds)

    def finished(self, state: str, created_at: float) -> None:
        """An attempt ended and left the request in `state` (sent, retry or dead)."""
        self.count(**{state: 1})
        if state == "sent" and self.metrics is not None:
            self.metrics.enqueue_to_sent_seconds.observe(max(0.0, time.time() - created_at))
