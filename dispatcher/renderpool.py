"""Rendering beside the event loop: templates and MIME in worker processes, on the other cores.

Workers are spawned, not forked (the daemon has threads and sockets), start with the daemon and
ignore SIGINT and SIGTERM: a terminal's Ctrl-C or a supervisor's signal to the whole process
group is the daemon's to act on, and a worker leaves when the daemon closes the pool or dies.
`templates.render_processes: 0` renders on the loop instead.

Every render is bounded: in time (`templates.render_timeout`), in the size of the message, and
in a worker, in memory. A request that passes a bound is dead with the reason; the others of
its batch are rendered all the same.
"""

import asyncio
import gc
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypedDict, Unpack

import orjson

from dispatcher import logline, wire
from dispatcher.compose import RenderedMessage
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.message import Redirect, render_request
from dispatcher.render import Renderer
from dispatcher.settings import DkimSettings

log = logging.getLogger(__name__)

PARENT_CHECK = 1.0  # seconds between a worker's looks at whether the daemon still runs
MAX_MESSAGE_BYTES = 10 * 1024 * 1024  # a rendered message larger than this is dead
WORKER_MEMORY = 1024 * 1024 * 1024  # address space of a render worker (RLIMIT_AS), bytes
KILL_GRACE = 2.0  # seconds past the render timeout before the daemon kills a silent worker


@dataclass(frozen=True, slots=True)
class Failed:
    """A request that could not be rendered."""

    reason: str
    permanent: bool  # the template or the request is at fault: dead; else retried later


Result = RenderedMessage | Failed


class RenderOptions(TypedDict, total=False):
    """The `Renderer` options from the settings that a worker gets as the parent has them."""

    locale: str
    dkim: DkimSettings | None


class RenderTimeout(BaseException):
    """Raised inside a render that passed its time bound, by the alarm `render_all` set.

    A BaseException, as KeyboardInterrupt is: no `except Exception` on the way (a filter, the
    renderer's own wrapping of template errors) may turn it into something else."""


_worker_renderer: Renderer | None = None  # in a worker process: built once by `_start`
_worker_redirect: Redirect | None = None  # `mail.redirect_to` in a worker, set by `_start`
_rendering = False  # the alarm may interrupt the code running now: a render's


def render_all(
    renderer: Renderer, batch: list[bytes], timeout: float, redirect: Redirect | None
) -> list[Result]:
    """Render a batch, each request within `timeout` seconds: SIGALRM interrupts a template
    spinning in Python at its next bytecode. Only the main thread receives signals, so on
    another (a daemon run on a thread, in tests) renders are bounded in size only."""
    if threading.current_thread() is not threading.main_thread():
        return [render_stored(renderer, stored, timeout, redirect) for stored in batch]
    previous = signal.signal(signal.SIGALRM, _expired)
    try:
        results = []
        for stored in batch:
            signal.setitimer(signal.ITIMER_REAL, timeout)  # each request's own deadline
            results.append(render_stored(renderer, stored, timeout, redirect))
        return results
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_stored(
    renderer: Renderer, stored: bytes, timeout: float, redirect: Redirect | None = None
) -> Result:
    """Render one request as the spool holds it (its wire-form JSON), within its bounds."""
    global _rendering
    try:
        _rendering = True
        request = wire.validate(orjson.loads(stored))
        # DKIM is the last step of every message, once: retries send these signed bytes.
        message = renderer.signed(render_request(renderer, request, redirect))
        _rendering = False  # an alarm handled from here on is ignored
    except RenderTimeout:
        return too_slow(stored, timeout)
    except MemoryError:
        return Failed(f"{template_of(stored)}: render ran out of memory", permanent=True)
    except (TemplateError, InvalidRequest) as exc:
        return Failed(str(exc), permanent=True)
    except Exception as exc:  # a bug, or a resource running out: try again later, never lose it
        return Failed(f"internal error: {type(exc).__name__}: {exc}", permanent=False)
    finally:
        _rendering = False
    if len(message.data) > MAX_MESSAGE_BYTES:
        return Failed(
            f"{template_of(stored)}: rendered message of {len(message.data)} bytes is over the"
            f" limit of {MAX_MESSAGE_BYTES} bytes",
            permanent=True,
        )
    return message


def too_slow(stored: bytes, timeout: float) -> Failed:
    return Failed(f"{template_of(stored)}: render took longer than {timeout:g} s", permanent=True)


def template_of(stored: bytes) -> str:
    """`template 'welcome'`: names the template in a bound's reason."""
    try:
        return f"template {orjson.loads(stored).get('template')!r}"
    except (orjson.JSONDecodeError, AttributeError):
        return "template ?"


def _expired(signum: int, frame: FrameType | None) -> None:
    if _rendering:
        raise RenderTimeout


def _start(
    templates_dir: Path,
    mail_from: str,
    auto_reload: bool,
    daemon: int,
    redirect: Redirect | None,
    options: RenderOptions,
    log_level: int,
) -> None:
    global _worker_renderer, _worker_redirect
    _worker_redirect = redirect
    logline.configure(log_level)  # its stderr is the daemon's: one line per record too
    for signum in (signal.SIGINT, signal.SIGTERM):  # the group's signals are the daemon's
        signal.signal(signum, signal.SIG_IGN)
    # A runaway render fails with MemoryError here, instead of growing until the OOM killer
    # picks a process, perhaps the daemon.
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    threading.Thread(target=_exit_with_parent, args=(daemon,), daemon=True).start()
    _worker_renderer = Renderer(templates_dir, mail_from, auto_reload=auto_reload, **options)
    gc.collect()  # the worker's start-up stays out of every later full collection, as the
    gc.freeze()  # daemon's does (`service.serve`)


def _exit_with_parent(parent: int) -> None:
    """End this worker once the daemon is gone. A daemon killed with SIGKILL cannot stop its
    workers, and they never see their queue close (each holds its write end too)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    os._exit(0)


def _render_batch(batch: list[bytes], timeout: float) -> list[Result]:
    assert _worker_renderer is not None, "worker started without its renderer"
    return render_all(_worker_renderer, batch, timeout, _worker_redirect)


class RenderPool:
    """Renders batches of stored requests in `processes` workers (0: on the event loop)."""

    def __init__(
        self,
        templates_dir: Path,
        mail_from: str,
        processes: int,
        *,
        timeout: float = 10.0,
        auto_reload: bool = False,
        redirect: Redirect | None = None,
        **options: Unpack[RenderOptions],
    ) -> None:
        self.options = options  # the default locale and DKIM key, for the workers too
        self.renderer = Renderer(templates_dir, mail_from, auto_reload=auto_reload, **options)
        self.auto_reload = auto_reload
        self.mail_from = mail_from
        self.processes = processes
        self.timeout = timeout
        self.redirect = redirect  # `mail.redirect_to`, applied to every request
        self.pool: ProcessPoolExecutor | None = None

    async def render(self, batch: list[bytes]) -> list[Result]:
        """One result per request, in order; never raises for a request or a dead worker."""
        if not batch:
            return []
        if not self.processes:
            return render_all(self.renderer, batch, self.timeout, self.redirect)
        size = -(-len(batch) // self.processes)  # one share per worker
        shares = [batch[start : start + size] for start in range(0, len(batch), size)]
        try:
            # A worker answers within `timeout` per request unless it is stuck where the alarm
            # cannot reach (in C code): then it is killed.
            rendered = await self._run(shares, self.timeout * size + KILL_GRACE)
            return [result for share in rendered for result in share]
        except (BrokenProcessPool, TimeoutError) as exc:  # killed (the OOM killer), or stuck
            log.error(
                "a render process died or hung (%s); rendering its batch one by one",
                exc or "no answer in time",
            )
            self.replace()
            return [await self.render_alone(stored) for stored in batch]

    async def render_alone(self, stored: bytes) -> Result:
        """Render one request in a worker of its own: a request that kills or hangs this one
        too is the culprit, and is dead; the others of its batch go on."""
        try:
            [[result]] = await self._run([[stored]], self.timeout + KILL_GRACE)
            return result
        except TimeoutError:
            self.replace()
            return too_slow(stored, self.timeout)
        except BrokenProcessPool:
            self.replace()
            return Failed(
                f"{template_of(stored)}: the render process died rendering it, twice (over its"
                f" memory limit of {WORKER_MEMORY >> 20} MB?)",
                permanent=True,
            )

    async def _run(self, shares: list[list[bytes]], seconds: float) -> list[list[Result]]:
        loop, pool = asyncio.get_running_loop(), self._pool()
        calls = [loop.run_in_executor(pool, _render_batch, share, self.timeout) for share in shares]
        async with asyncio.timeout(seconds):
            return await asyncio.gather(*calls)

    def replace(self) -> None:
        """Kill the workers (they ignore SIGTERM, and a stuck one would never take the pool's
        word); new ones start with the next render."""
        pool, self.pool = self.pool, None
        if pool is not None:
            for process in list(pool._processes.values()):
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def start(self) -> None:
        """Spawn the workers now, in the background: a worker's start-up (imports, ~0.3 s)
        would otherwise delay the first mail after the daemon starts."""
        if self.processes:
            pool = self._pool()
            for _ in range(self.processes):  # the pool spawns a worker per waiting task
                pool.submit(_render_batch, [], self.timeout)

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                # The daemon's pid, not the worker's getppid(): a daemon killed while the
                # worker was still starting has already been replaced by init there.
                initargs=(
                    self.renderer.templates_dir,
                    self.mail_from,
                    self.auto_reload,
                    os.getpid(),
                    self.redirect,
                    self.options,
                    logging.getLogger().getEffectiveLevel(),
                ),
            )
        return self.pool

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
