"""Real `dispatcher preview` / `dispatcher dev` processes, the preview server on a thread of the
test process, a templates folder they have never seen, and a plain HTTP client for their pages."""

import asyncio
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from dispatcher.devserver import develop
from dispatcher.preview import PreviewServer
from dispatcher.settings import Settings, load_settings
from tests.daemon import DaemonProcess, InProcessDaemon, in_process, write_settings

# No proxy, whatever the environment says: every request goes straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

LAYOUT = """<!DOCTYPE html>
<html><head><style>
  .note { color: #0a7d32; font-weight: bold; }
  @media (max-width: 480px) { .note { font-size: 12px; } }
</style></head>
<body>{% block content %}{% endblock %}</body></html>
"""


def write_templates(folder: Path) -> Path:
    """`invoice` (HTML with a layout and a style block, two samples) and `notice` (text only,
    no samples): names that exist nowhere in the shipped templates."""
    invoice = folder / "invoice"
    invoice.mkdir(parents=True)
    (folder / "_layouts").mkdir()
    (folder / "_layouts" / "plain.html").write_text(LAYOUT)
    (invoice / "subject.txt").write_text("Invoice {{ number }} for {{ customer }}\n")
    (invoice / "body.html").write_text(
        '{% extends "_layouts/plain.html" %}\n'
        "{% block content %}\n"
        "<h1>Invoice {{ number }}</h1>\n"
        '<p class="note">Amount due: {{ amount }} EUR</p>\n'
        '<p><a href="https://example.com/pay/{{ number }}">Pay now</a></p>\n'
        "{% endblock %}\n"
    )
    (invoice / "preview.yaml").write_text(
        'paid:\n  number: "A-17"\n  customer: "Grace"\n  amount: "12.50"\n'
        'overdue:\n  number: "B-99"\n  customer: "Linus & Co"\n  amount: "990.00"\n'
    )
    notice = folder / "notice"
    notice.mkdir()
    (notice / "subject.txt").write_text("Maintenance tonight\n")
    (notice / "body.txt").write_text("The service is down from 22:00 to 23:00.\n")
    return folder


def preview_settings(folder: Path) -> Path:
    """Settings whose templates folder is a new one from `write_templates`."""
    write_templates(folder / "templates")
    return write_settings(folder, 1025, templates={"dir": "templates"})


@dataclass(frozen=True)
class Page:
    """One HTTP answer: status, headers, and the body as text (bytes in `raw`)."""

    status: int
    headers: Message
    raw: bytes

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8")


def fetch(url: str, path: str) -> Page:
    """GET a path of the UI at `url`; error statuses are answers too, not exceptions."""
    try:
        with _OPENER.open(url + path.lstrip("/"), timeout=20) as response:
            return Page(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Page(error.code, error.headers, error.read())


class UiProcess(DaemonProcess):
    """`dispatcher preview` or `dispatcher dev` on a free port; `url` is where it serves."""

    def __init__(self, settings_path: Path, command: str, ready: str) -> None:
        super().__init__(settings_path, (command, "--port", "0"), ready=ready)
        self.wait_for_log("preview on http://127.0.0.1:")
        found = re.search(r"preview on (http://127\.0\.0\.1:\d+/)", self.log)
        assert found, self.log
        self.url = found[1]

    def get(self, path: str) -> Page:
        return fetch(self.url, path)

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C, as a developer stops it; returns the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)


class InProcessPreview:
    """The server `dispatcher preview` runs (`PreviewServer`), on its thread in this process."""

    def __init__(self, settings_path: Path) -> None:
        self.server = PreviewServer(load_settings(settings_path, environ={}), 0)
        self.server.start()
        self.url = self.server.url

    def get(self, path: str) -> Page:
        return fetch(self.url, path)


class InProcessDev(InProcessDaemon):
    """`dispatcher dev` (daemon, capture SMTP server, preview on a free port) on a thread of this
    process; stopped as Ctrl-C stops the command. `render_processes` as for `InProcessDaemon`."""

    def __init__(self, settings_path: Path, render_processes: int | None = 0) -> None:
        super().__init__(settings_path, render_processes, serve=develop_on_a_free_port)
        found = re.search(r"preview on (http://127\.0\.0\.1:\d+/)", self.log)
        assert found, self.log
        self.url = found[1]

    def get(self, path: str) -> Page:
        return fetch(self.url, path)


async def develop_on_a_free_port(settings: Settings, stop: asyncio.Event) -> None:
    await develop(settings, 0, stop)


@pytest.fixture
def start_ui(tmp_path: Path) -> Iterator[Callable[..., UiProcess]]:
    """Factory: `start_ui("preview")` on a never-seen templates folder, or on given settings;
    every process started is killed after the test."""
    started: list[UiProcess] = []

    def start(command: str = "preview", settings: Path | None = None) -> UiProcess:
        if settings is None:
            settings = preview_settings(tmp_path)
        ready = "listening on" if command == "dev" else "preview on"
        process = UiProcess(settings, command, ready)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def preview(tmp_path: Path) -> Iterator[InProcessPreview]:
    """The preview server in this process on a never-seen templates folder; stopped (its thread
    joined, its socket closed) after the test."""
    preview = InProcessPreview(preview_settings(tmp_path))
    try:
        yield preview
    finally:
        preview.server.stop()


@pytest.fixture
def run_dev(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., InProcessDev]]:
    """Factory: `dispatcher dev` in this process on a settings file (see `InProcessDev`)."""
    yield from in_process(monkeypatch, InProcessDev)
