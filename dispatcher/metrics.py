"""The Prometheus endpoint (`metrics.bind`): what the daemon did, and what waits in its spool.

Counters and histograms are updated by the daemon as events happen. The queue figures are
read from the spool when Prometheus scrapes, on the HTTP server's thread, through a reader of
their own that never waits for the daemon's writes, so the figures are as fresh as the scrape.
Each daemon has its own registry, never the global one.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dispatcher.errors import StartupError
from dispatcher.settings import SpoolSettings
from dispatcher.spool import STATES, open_reader

log = logging.getLogger(__name__)

OUTCOMES = ("received", "sent", "retry", "dead", "rejected")
# One SMTP transaction: milliseconds on a LAN relay, seconds for a slow or remote one.
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# From acceptance into the spool to the server's 250: sub-second when healthy, hours with
# retries (and with `send_at`, whatever the sender asked for).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class Metrics:
    """The daemon's metrics, served over HTTP on loopback once `serve()` is called."""

    def __init__(
        self,
        spool: SpoolSettings,
        open_connections: Callable[[], int],
        store_available: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "dispatcher_messages",
            "Requests received, attempts sent or deferred (retry), requests given up (dead),"
            " and frames rejected at intake",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:  # every series exists from the start, at zero
            self.messages.labels(outcome)
        self.send_seconds = Histogram(
            "dispatcher_send_duration_seconds",
            "Duration of one SMTP delivery attempt, whatever its outcome",
            buckets=SEND_BUCKETS,
            registry=self.registry,
        )
        self.enqueue_to_sent_seconds = Histogram(
            "dispatcher_enqueue_to_sent_seconds",
            "From acceptance into the spool until the SMTP server took the message",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        Gauge(
            "dispatcher_smtp_connections",
            "SMTP connections open now",
            registry=self.registry,
        ).set_function(open_connections)
        self.relay_up = Gauge(
            "dispatcher_relay_up",
            "1 while the relay (host:port) takes mail, 0 while it is down and being probed",
            ["relay"],
            registry=self.registry,
        )
        Gauge(
            "dispatcher_store_available",
            "1 while the daemon can write to its spool, 0 while a write fails (a full disk)",
            registry=self.registry,
        ).set_function(store_available)
        self.registry.register(SpoolCollector(spool))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> None:
        """Listen on host:port, on a thread of its own; a bind failure is a `StartupError`."""
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise StartupError(f"metrics.bind: cannot listen on {host}:{port}: {exc}") from None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


class SpoolCollector(Collector):
    """Queue depth by state and the age of the oldest waiting request, read at scrape time."""

    def __init__(self, spool: SpoolSettings) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        try:
            with open_reader(self.spool) as spool:
                counts, oldest = spool.counts(), spool.oldest_waiting()
        except Exception as exc:  # a scrape reports what it can; the daemon goes on
            log.warning("metrics: cannot read the spool: %s", exc)
            return
        depth = GaugeMetricFamily(
            "dispatcher_queue_depth", "Requests in the spool by state", labels=["state"]
        )
        for state in STATES:
            depth.add_metric([state], counts[state])
        yield depth
        yield GaugeMetricFamily(
            "dispatcher_oldest_queued_age_seconds",
            "Age of the oldest request not yet sent or dead (0 when none waits)",
            value=0.0 if oldest is None else max(0.0, time.time() - oldest),
        )
