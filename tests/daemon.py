"""A real daemon for end-to-end tests, with its settings file and spool: `dispatcher run` in a
subprocess (`start_daemon`), or the same `Daemon` on a thread of the test process (`run_daemon`)
where the process boundary is not what a test is about."""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from dispatcher import client
from dispatcher.logline import OneLineFormatter
from dispatcher.service import Daemon
from dispatcher.settings import Settings, load_settings
from dispatcher.spool import open_reader

ROOT = Path(__file__).parents[1]
START_TIMEOUT = 30.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as `dispatcher run` logs
# Set when the test run itself is a systemd service: never the daemon's to answer.
SERVICE_MANAGER_ENV = ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


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
        "smtp": {
            "host": "127.0.0.1",
            "port": smtp_port,
            "timeout": 5,
            "connections": 4,
            "probe": [0.05, 0.3],  # a relay that was down is tried again as fast as retries
        },
        # Fast retries, and so many that a slow machine never exhausts them while a test
        # keeps a fault in place: tests of retrying must not turn into tests of giving up.
        "retry": {"attempts": 1000, "backoff": [0.05, 0.3], "max_age": 600},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class RunningDaemon:
    """What a test sees of a running daemon: its log lines as they come, and its spool."""

    def __init__(self, settings_path: Path, settings: Settings) -> None:
        self.settings_path = settings_path
        self.settings = settings
        self.lines: list[str] = []
        self.log_closed = False  # the daemon ended and every line it logged is in `lines`
        self._changed = threading.Condition()

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def _add_line(self, line: str) -> None:
        with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    def _close_log(self) -> None:
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
        with open_reader(self.settings.spool) as spool:
            return spool.counts()

    def wait_for_counts(self, timeout: float = 20.0, **expected: int) -> dict[str, int]:
        """Bounded poll of the spool (the daemon owns it) until the counts match."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if all(counts[k] == v for k, v in expected.items()):
                return counts
            if time.monotonic() > deadline or not self.alive:
                raise AssertionError(f"spool counts {counts}, expected {expected}\n{self.log}")
            time.sleep(0.05)


class DaemonProcess(RunningDaemon):
    """`python -m dispatcher run` in a subprocess; its log lines are collected as they come.

    `command` runs another long-lived command instead (`dev`, `preview --port 0`), ready once
    a log line contains `ready`. `own_group`: in a process group of its own, as a terminal or a
    supervisor starts it, so a test can signal the whole group.
    """

    def __init__(
        self,
        settings_path: Path,
        command: tuple[str, ...] = ("run",),
        ready: str = "listening on",
        env: dict[str, str] | None = None,
        *,
        own_group: bool = False,
    ) -> None:
        super().__init__(settings_path, load_settings(settings_path, environ={}))
        environ = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in SERVICE_MANAGER_ENV:
            environ.pop(name, None)  # the test run's own service manager is not the daemon's
        environ.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *command, "--settings", str(settings_path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=environ,
            process_group=0 if own_group else None,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_log(ready, START_TIMEOUT)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._add_line(line.rstrip("\n"))
        self._close_log()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status (the test fails if it takes longer than `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]
T = TypeVar("T")


class InProcessDaemon(RunningDaemon):
    """`Daemon(settings).run(stop)` on an event loop in a thread of the test process: the daemon
    `dispatcher run` serves, without starting Python and importing it for every test.

    Its log lines are the records of the `dispatcher` loggers made on its thread, formatted as
    `dispatcher run` writes them. `render_processes` replaces `templates.render_processes` (0:
    render on the loop; a worker costs a Python start too); None keeps the settings file's.
    `serve` runs another command's coroutine instead (`develop` for `dispatcher dev`).
    """

    _running = 0  # daemons alive in this process: the first lowers the logger level, the last
    _saved_level = logging.NOTSET  # puts it back

    def __init__(
        self, settings_path: Path, render_processes: int | None = 0, serve: Serve | None = None
    ) -> None:
        overrides = (
            {} if render_processes is None else {"templates__render_processes": render_processes}
        )
        super().__init__(settings_path, load_settings(settings_path, overrides, environ={}))
        self._serve = self._run_daemon if serve is None else serve
        self.daemon: Daemon | None = None  # the one `dispatcher run` would serve, once made
        self.error: BaseException | None = None  # what ended the daemon, if not a stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()  # _loop and _stop are set, or the thread has ended
        # A daemon thread: one that failed to stop has failed its test, and must not also hang
        # the run's exit. `stop()` checks that the thread ended.
        self._thread = threading.Thread(
            target=self._main, name=f"daemon {settings_path}", daemon=True
        )
        self._handler = _LineHandler(self._thread, self._add_line)
        self._handler.setLevel(self.settings.log.level)
        self._attach()
        self._thread.start()
        try:
            self.wait_for_log("listening on", START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _attach(self) -> None:
        logger = logging.getLogger("dispatcher")
        if InProcessDaemon._running == 0:
            InProcessDaemon._saved_level = logger.level
        InProcessDaemon._running += 1
        logger.setLevel(min(logger.getEffectiveLevel(), self._handler.level))
        logger.addHandler(self._handler)

    def _detach(self) -> None:
        logger = logging.getLogger("dispatcher")
        logger.removeHandler(self._handler)
        InProcessDaemon._running -= 1
        if InProcessDaemon._running == 0:
            logger.setLevel(InProcessDaemon._saved_level)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # a start-up error or a crashed task: the test sees it
            self.error = exc
            for line in "".join(traceback.format_exception(exc)).splitlines():
                self._add_line(line)
        finally:
            self._ready.set()
            self._close_log()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._serve(self.settings, self._stop)

    async def _run_daemon(self, settings: Settings, stop: asyncio.Event) -> None:
        """What `dispatcher run` serves until SIGTERM, here until `stop` is set."""
        self.daemon = Daemon(settings)
        try:
            await self.daemon.run(stop)
        finally:
            self.daemon.close()

    def call(self, function: Callable[[Daemon], T]) -> T:
        """Run `function(daemon)` on the daemon's own thread (its spool connection lives there)
        and return what it returns."""
        loop, daemon = self._loop, self.daemon
        assert loop is not None and daemon is not None, "the daemon is not running"

        async def run() -> T:
            return function(daemon)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(START_TIMEOUT)

    def reload(self) -> None:
        """Ask the daemon to re-read its CURVE allowlist, as SIGHUP does (a signal would hit
        pytest); the daemon logs when it is done."""
        loop, daemon = self._loop, self.daemon
        assert loop is not None and daemon is not None, "the daemon is not running"
        loop.call_soon_threadsafe(daemon.reload)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> int:
        """Set the daemon's stop event, as SIGTERM does; 0 if it then ended cleanly, else 1 (the
        test fails if it takes longer than `timeout`). Stopping twice is harmless."""
        self._ready.wait(timeout)
        loop, stop = self._loop, self._stop
        if self._thread.is_alive() and loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: it has ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"daemon still running {timeout} s after stop:\n{self.log}")
        if self._handler in logging.getLogger("dispatcher").handlers:
            self._detach()
        return 0 if self.error is None else 1


class _LineHandler(logging.Handler):
    """Adds the records made on one daemon's thread to its lines, as `dispatcher run` logs."""

    def __init__(self, thread: threading.Thread, add_line: Callable[[str], None]) -> None:
        super().__init__()
        self.thread = thread
        self.add_line = add_line
        self.setFormatter(OneLineFormatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread.ident:  # not the test's client, nor another daemon
            self.add_line(self.format(record))


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
    client.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: start a daemon on a settings file; every one started is stopped afterwards."""
    started: list[DaemonProcess] = []

    def start(
        settings_path: Path, env: dict[str, str] | None = None, *, own_group: bool = False
    ) -> DaemonProcess:
        daemon = DaemonProcess(settings_path, env=env, own_group=own_group)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


D = TypeVar("D", bound=InProcessDaemon)


def in_process(monkeypatch: pytest.MonkeyPatch, kind: type[D]) -> Iterator[Callable[..., D]]:
    """A fixture's factory of `kind` (`InProcessDaemon` or a subclass), on a settings file:
    every one started is stopped and its thread joined after the test."""
    for name in SERVICE_MANAGER_ENV:
        monkeypatch.delenv(name, raising=False)
    started: list[D] = []

    def start(settings_path: Path, render_processes: int | None = 0) -> D:
        daemon = kind(settings_path, render_processes)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def run_daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., InProcessDaemon]]:
    """Factory: start a daemon in this process on a settings file (see `InProcessDaemon`)."""
    yield from in_process(monkeypatch, InProcessDaemon)
