"""The daemon: intake and delivery around one spool, as named tasks under one TaskGroup."""

import asyncio
import contextlib
import gc
import logging
import signal
import socket

import zmq.asyncio

from dispatcher.admission import Admission, policies
from dispatcher.delivery import SHUTDOWN_GRACE, Delivery
from dispatcher.errors import StartupError, StoreUnavailable
from dispatcher.intake import Intake
from dispatcher.message import Redirect
from dispatcher.observer import Observer
from dispatcher.renderpool import RenderPool
from dispatcher.settings import Settings
from dispatcher.spool import Spool, now, open_spool

__all__ = ["SHUTDOWN_GRACE", "Daemon", "serve"]

log = logging.getLogger(__name__)

PRUNE_EVERY = 600.0  # seconds between retention passes over sent requests
PRUNE_SLICE = 5000  # rows deleted per transaction, so the loop is never held for long


def instance_name(settings: Settings) -> str:
    """Who holds a claim: the same name across restarts of one daemon, so a restart frees what
    its earlier life held, and different for two daemons (they cannot bind one address)."""
    return f"{socket.gethostname()} {settings.intake.bind}"


class Daemon:
    """The running service: the spool, the renderer, intake and delivery."""

    def __init__(self, settings: Settings, *, auto_reload: bool = False) -> None:
        """`auto_reload`: templates edited while it runs are used for the next render
        (`dispatcher dev`); a production daemon compiles each template once."""
        self.settings = settings
        self.reload_requested = asyncio.Event()
        if not settings.templates.dir.is_dir():
            raise StartupError(f"templates.dir: {settings.templates.dir} is not a folder")
        self.renders = RenderPool(
            settings.templates.dir,
            settings.mail.from_,
            settings.templates.render_processes,
            timeout=settings.templates.render_timeout,
            auto_reload=auto_reload,
            redirect=Redirect.of(settings.mail),
            locale=settings.templates.locale,
            dkim=settings.dkim,
        )
        self.spool: Spool = open_spool(settings.spool, instance_name(settings))
        self.observer = Observer(settings, self.spool)
        self.context = zmq.asyncio.Context()
        self.delivery = Delivery(
            settings, self.spool, self.renders, self.observer, Admission(policies(settings))
        )
        try:
            self.intake = Intake(
                settings,
                self.context,
                self.spool,
                self.observer,
                self.renders.renderer.has_template,
                self.delivery.wake.set,
                lambda: bool(self.delivery.held),
            )
        except BaseException:
            self.close(intake=False)
            raise

    def close(self, *, intake: bool = True) -> None:
        self.renders.close()
        self.observer.close()
        if intake:
            self.intake.close()
        self.context.term()
        self.spool.close()

    async def prune(self) -> None:
        """Delete sent requests older than `spool.keep_sent`, a slice at a time, once per
        PRUNE_EVERY across the daemons sharing the spool."""
        keep = self.settings.spool.keep_sent
        while True:
            removed = 0
            with contextlib.suppress(StoreUnavailable):  # its writers tell; pruned next time
                if self.spool.due("prune", PRUNE_EVERY, now()):  # one daemon of those sharing it
                    while (n := self.spool.purge("sent", keep, now(), limit=PRUNE_SLICE)) > 0:
                        removed += n
                        await asyncio.sleep(0)
            if removed:
                log.info("pruned %d sent requests older than %g s", removed, keep)
            await asyncio.sleep(PRUNE_EVERY)

    def reload(self) -> None:
        """Ask the loop to re-read the CURVE allowlist (SIGHUP): safe from a signal handler."""
        self.reload_requested.set()

    async def reloads(self) -> None:
        """Reload on request, on the loop between intake batches."""
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            try:
                await self.intake.reload()
            except Exception:  # a reload that fails must not take the daemon down with it
                log.exception("reload failed; the daemon goes on as it was")

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down within SHUTDOWN_GRACE seconds."""
        self.renders.start()
        self.observer.start()  # metrics endpoint, then READY=1: every socket is bound
        relays = self.settings.smtp.relays
        log.info(
            "listening on %s (receipts on %s), delivering to %s",
            self.settings.intake.bind,
            self.settings.intake.acks,
            ", then ".join(f"{r.name} with {r.connections} connections" for r in relays),
        )
        delivery = self.delivery
        async with asyncio.TaskGroup() as group:
            watchdog = group.create_task(self.observer.keep_alive(), name="watchdog")
            intake = group.create_task(self.intake.serve(), name="intake")
            feeder = group.create_task(delivery.feed(), name="feeder")
            chores = [
                group.create_task(self.intake.ingest_overflow(), name="overflow"),
                group.create_task(self.intake.publisher.serve(), name="subscriptions"),
                group.create_task(self.prune(), name="prune"),
                group.create_task(delivery.keep_claims(), name="claims"),
                group.create_task(self.reloads(), name="reloads"),
                group.create_task(delivery.relays.probe(), name="prober"),
            ]
            workers = [
                group.create_task(delivery.work(relay), name=f"worker-{relay.name}-{i}")
                for relay in delivery.relays.all
                for i in range(relay.settings.connections)
            ]
            await stop.wait()
            log.info("stopping: no new requests; finishing sends in flight")
            self.observer.stopping()
            intake.cancel()
            for chore in chores:
                chore.cancel()
            self.intake.drain()  # what already arrived is stored, not dropped
            feeder.cancel()
            await asyncio.wait([feeder])
            await delivery.stop(workers)
            watchdog.cancel()
        counts = self.observer.counts
        log.info("stopped: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "idle")


async def serve(settings: Settings) -> None:
    """Run a daemon until SIGTERM or SIGINT; SIGHUP re-reads the CURVE allowlist."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(settings)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    # What exists now (modules, settings, the spool) lives as long as the process: frozen out
    # of the collector's sight, a full collection scans only what serving made since, and holds
    # the loop for a fraction of the time.
    gc.collect()
    gc.freeze()
    try:
        await daemon.run(stop)
    finally:
        daemon.close()
