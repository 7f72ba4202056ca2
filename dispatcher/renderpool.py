"""Rendering beside the event loop: templates and MIME in worker processes, on the other cores.

Workers are spawned, not forked (the daemon has threads and sockets), ignore SIGINT (Ctrl-C in
`dispatcher dev` is the parent's) and start with the daemon; `templates.render_processes: 0`
renders on the loop instead.
"""

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

import orjson

from dispatcher import wire
from dispatcher.compose import RenderedMessage
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.render import Renderer
from dispatcher.settings import DkimSettings

log = logging.getLogger(__name__)

PARENT_CHECK = 1.0  # seconds between a worker's looks at whether the daemon still runs


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


_worker_renderer: Renderer | None = None  # in a worker process: built once by `_start`


def render_stored(renderer: Renderer, stored: bytes) -> Result:
    """Render one request as the spool holds it (its wire-form JSON)."""
    try:
        message = renderer.render(wire.validate(orjson.loads(stored)))
        return renderer.signed(message)  # the last step of every message: DKIM, once
    except (TemplateError, InvalidRequest) as exc:
        return Failed(str(exc), permanent=True)
    except Exception as exc:  # a bug, or a resource running out: try again later, never lose it
        return Failed(f"internal error: {type(exc).__name__}: {exc}", permanent=False)


def _start(
    templates_dir: Path, mail_from: str, auto_reload: bool, daemon: int, options: RenderOptions
) -> None:
    global _worker_renderer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(daemon,), daemon=True).start()
    _worker_renderer = Renderer(templates_dir, mail_from, auto_reload=auto_reload, **options)


def _exit_with_parent(parent: int) -> None:
    """End this worker once the daemon is gone. A daemon killed with SIGKILL cannot stop its
    workers, and they never see their queue close (each holds its write end too)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    os._exit(0)


def _render_batch(batch: list[bytes]) -> list[Result]:
    assert _worker_renderer is not None, "worker started without its renderer"
    return [render_stored(_worker_renderer, stored) for stored in batch]


class RenderPool:
    """Renders batches of stored requests in `processes` workers (0: on the event loop)."""

    def __init__(
        self,
        templates_dir: Path,
        mail_from: str,
        processes: int,
        *,
        auto_reload: bool = False,
        **options: Unpack[RenderOptions],
    ) -> None:
        self.options = options  # the default locale and DKIM key, for the workers too
        self.renderer = Renderer(templates_dir, mail_from, auto_reload=auto_reload, **options)
        self.auto_reload = auto_reload
        self.mail_from = mail_from
        self.processes = processes
        self.pool: ProcessPoolExecutor | None = None

    async def render(self, batch: list[bytes]) -> list[Result]:
        """One result per request, in order; never raises for a request or a dead worker."""
        if not batch:
            return []
        if not self.processes:
            return [render_stored(self.renderer, stored) for stored in batch]
        loop = asyncio.get_running_loop()
        pool, size = self._pool(), -(-len(batch) // self.processes)  # one share per worker
        shares = [batch[start : start + size] for start in range(0, len(batch), size)]
        try:
            rendered = await asyncio.gather(
                *(loop.run_in_executor(pool, _render_batch, share) for share in shares)
            )
            return [result for share in rendered for result in share]
        except BrokenProcessPool as exc:  # a worker was killed (the OOM killer, say)
            log.error("a render process died (%s); starting new ones", exc)
            self.close()
            return [Failed("render process died; will try again", permanent=False)] * len(batch)

    def start(self) -> None:
        """Spawn the workers now, in the background: a worker's start-up (imports, ~0.3 s)
        would otherwise delay the first mail after the daemon starts."""
        if self.processes:
            pool = self._pool()
            for _ in range(self.processes):  # the pool spawns a worker per waiting task
                pool.submit(_render_batch, [])

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
                    self.options,
                ),
            )
        return self.pool

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
