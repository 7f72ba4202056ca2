"""`dispatcher dev`: the daemon, a capture SMTP server and the preview UI in one process.

The daemon delivers over real SMTP, as in production, to an aiosmtpd server that files every
message in the Outbox folder. One Ctrl-C stops all three, the daemon first, so sends in flight
still reach the capture server.
"""

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from dispatcher.errors import StartupError
from dispatcher.hosts import is_loopback
from dispatcher.outbox import Outbox
from dispatcher.preview import PreviewServer
from dispatcher.service import Daemon
from dispatcher.settings import Settings

log = logging.getLogger(__name__)


def outbox_folder(settings: Settings) -> Path:
    """Captured mail lives next to the spool: `var/outbox` with the shipped settings."""
    return settings.spool.path.parent / "outbox"


class CaptureHandler:
    """aiosmtpd hook: every message that reaches DATA is accepted and filed."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content
        message_id = self.outbox.add(envelope.mail_from, list(envelope.rcpt_tos), data)
        log.info("captured %s for %s", message_id, ", ".join(envelope.rcpt_tos))
        return f"250 2.0.0 Ok: captured as {message_id}"


async def start_capture(outbox: Outbox, host: str, port: int) -> asyncio.Server:
    """Listen for SMTP on host:port; refuses anything but a loopback address."""
    if not is_loopback(host):
        raise StartupError(
            f"smtp.host: dev captures mail on smtp.host, which must be a loopback address "
            f"(got {host!r}); use the shipped settings or DISPATCHER_SMTP__HOST=127.0.0.1"
        )
    handler = CaptureHandler(outbox)
    loop = asyncio.get_running_loop()
    try:
        # hostname given, so that aiosmtpd does not ask DNS for this machine's FQDN.
        return await loop.create_server(
            lambda: SMTP(handler, hostname="dispatcher-dev"), host, port
        )
    except OSError as exc:
        raise StartupError(
            f"smtp.port: cannot capture mail on {host}:{port}: {exc.strerror}"
            " (is another mail server or `dispatcher dev` running?)"
        ) from None


async def develop(settings: Settings, port: int, stop: asyncio.Event | None = None) -> None:
    """Run the three parts until SIGINT or SIGTERM, then stop them in order. A given `stop`
    replaces the signals (tests run dev on a thread, where signals cannot be handled)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    outbox = Outbox(outbox_folder(settings))
    capture = await start_capture(outbox, settings.smtp.host, settings.smtp.port)
    try:
        log.info(
            "capturing mail sent to %s:%d in %s",
            settings.smtp.host,
            settings.smtp.port,
            outbox.folder,
        )
        preview = PreviewServer(settings, port, outbox)
        try:
            daemon = Daemon(settings, auto_reload=True)  # edits show in the next mail
            preview.start()
            try:
                await daemon.run(stop)
            finally:
                daemon.close()
        finally:
            preview.stop()
    finally:
        capture.close()
        await capture.wait_closed()
    log.info("dev stopped")
