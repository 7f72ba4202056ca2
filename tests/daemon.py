"""A real `dispatcher run` process for end-to-end tests, with its settings file and spool."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher import client
from dispatcher.settings import Settings, load_settings
from dispatcher.spool.sqlite import SqliteReader

ROOT = Path(__file__).parents[1]
START_TIMEOUT = 30.0


def write_settings(folder: Path, smtp_port: int, **sections: dict[str, Any]) -> Path:
    """A settings file for one test: ipc sockets in a short folder, fast retries."""
    sockets = folder.resolve()
    assert len(f"{sockets}/intake") < 100, "ipc:// paths are limited to ~100 bytes"
    data: dict[str, dict[str, Any]] = {
        "intake": {"bind": f"ipc://{sockets}/intake", "acks": f"ipc://{sockets}/acks"},
        "client": {
            "connect": [f"ipc://{sockets}/intake"],
            "acks": [f"ipc://{sockets}/acks"],
            "overflow_dir": "overflow",
        },
        "spool": {"path": "spool.sqlite3"},
        "templates": {"dir": str(ROOT / "templates")},
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "timeout": 5, "connections": 4},
        # Fast retries, and so many that a slow machine never exhausts them while a test
        # keeps a fault in place: tests of retrying must not turn into tests of giving up.
        "retry": {"attempts": 1000, "backoff": [0.05, 0.3], "max_age": 600},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class DaemonProcess:
    """`python -m dispatcher run` in a subprocess; its log lines are collected as they come.

    `command` runs another long-lived command instead (`dev`, `preview --port 0`), ready once
    a log line contains `ready`.
    """

    def __init__(
        self,
        settings_path: Path,
        command: tuple[str, ...] = ("run",),
        ready: str = "listening on",
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings_path = settings_path
        self.settings: Settings = load_settings(settings_path, environ={})
        self.lines: list[str] = []
        self.log_closed = False  # the process ended and its stderr is read to the end
        self._changed = threading.Condition()
        environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            environ.pop(name, None)  # the test run's own service manager is not the daemon's
        environ.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *command, "--settings", str(settings_path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=environ,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_log(ready, START_TIMEOUT)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.log_closed = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Block until a log line contains `text`; fail with the log if the daemon died."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.log_closed:
                    lines = "\n".join(self.lines)
                    raise AssertionError(f"no log line with {text!r} within {timeout} s:\n{lines}")
                self._changed.wait(left)

    def counts(self) -> dict[str, int]:
        with SqliteReader(self.settings.spool.path) as spool:
            return spool.counts()

    def wait_for_counts(self, timeout: float = 20.0, **expected: int) -> dict[str, int]:
        """Bounded poll of the spool (another process owns it) until the counts match."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if all(counts[k] == v for k, v in expected.items()):
                return counts
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"spool counts {counts}, expected {expected}\n{self.log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status (the test fails if it takes longer than `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def run_cli(*args: str, settings: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m dispatcher ARGS [--settings PATH]` as a user would, bounded in time."""
    command = [sys.executable, "-m", "dispatcher", *args]
    if settings is not None:
        command += ["--settings", str(settings)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def fresh_client() -> Iterator[None]:
    """Closes this process's `enqueue_email()` client after the test, so the next test's
    `configure()` starts from nothing."""
    yield
    client._state.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: start a daemon on a settings file; every one started is stopped afterwards."""
    started: list[DaemonProcess] = []

    def start(settings_path: Path, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(settings_path, env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
