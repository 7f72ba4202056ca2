"""The systemd notification protocol (sd_notify(3)), without libsystemd.

READY, WATCHDOG, STATUS and STOPPING datagrams to `$NOTIFY_SOCKET`; without it every call is a
no-op, so the daemon behaves the same outside systemd.
"""

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

STATUS_INTERVAL = 10.0  # seconds between STATUS= updates when no watchdog is asked for


class Notifier:
    """Sends notifications to the service manager named in the environment, if any."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(environ)
        self._socket: socket.socket | None = None
        self._warned = False
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; False (and one warning) if it cannot go."""
        if self._socket is None or self.address is None:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._warned:  # a manager that went away must not flood the log
                log.warning("cannot notify the service manager at %r: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING="1", STATUS=status)

    async def keep_alive(self, status: Callable[[], str]) -> None:
        """Ping the watchdog at half its interval, with a fresh `STATUS=`, until cancelled.

        Runs on the event loop on purpose: a loop that is stuck stops the pings, and the
        manager restarts the service. Without a watchdog, only the status is refreshed.
        """
        if not self.enabled:
            return
        interval = self.watchdog_interval
        ping = {} if interval is None else {"WATCHDOG": "1"}
        while True:
            self.notify(**ping, STATUS=status())
            await asyncio.sleep(interval or STATUS_INTERVAL)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(name: str) -> str | bytes | None:
    """The socket address: a path, or an abstract name (`@` becomes a leading NUL byte)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # unset, or a kind of address (vsock:) this daemon does not speak


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of `$WATCHDOG_USEC` in seconds, if the watchdog is meant for this process."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # set for another process (we were started by a wrapper that forked)
    return int(usec) / 2 / 1_000_000
