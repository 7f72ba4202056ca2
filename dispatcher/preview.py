"""The preview web UI: every template with every sample, and the Outbox of `dispatcher dev`.

Server-rendered pages on 127.0.0.1 (the stdlib's threading HTTP server); one small script adds
live refresh. A message is always shown from its RFC 5322 bytes, parsed back, so what you see is
what a mail client gets.
"""

import base64
import contextlib
import email
import email.policy
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import jinja2

from dispatcher.errors import InvalidRequest, NotFound, SpoolError, StartupError, TemplateError
from dispatcher.outbox import Outbox
from dispatcher.render import Renderer
from dispatcher.settings import Settings
from dispatcher.spool import open_reader

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 8025
VIEWS = ("desktop", "mobile", "text", "headers")
SOURCE_CONTEXT = 2  # template lines shown around the line of an error
FAILURES_LISTED = 20  # requests the Outbox lists as not delivered
STOP_POLL = 0.1  # seconds until the server notices stop(): Ctrl-C and tests wait as long
# The UI's own pages load nothing but this server's script and style sheet.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# A mail's HTML part: no scripts, no plugins, no forms, inline styles (that is what mail is) and
# images. `sandbox` gives it an opaque origin even if opened outside the iframe.
MAIL_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data: cid: http: https:; "
    "font-src data:; frame-ancestors 'self'"
)
# What no page may be: framed by another site (clickjacking), or kept in a cache (captured mail).
NO_FRAMING = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
NO_STORE = {"Cache-Control": "no-store"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WRONG_HOST = (
    b"forbidden: the Host header must be localhost, 127.0.0.1 or [::1] with this server's port"
    b" (a guard against DNS rebinding)\n"
)


@dataclass(frozen=True, slots=True)
class Response:
    """What a route returns; the request handler only writes it out."""

    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: HTTPStatus = HTTPStatus.OK
    headers: dict[str, str] = field(default_factory=dict)
    framable: bool = False  # only the HTML part the preview's own page shows in its iframe


@dataclass(frozen=True, slots=True)
class MessageView:
    """A message as the page shows it, parsed back from its bytes."""

    subject: str
    sender: str
    to: str
    date: str
    headers: list[tuple[str, str]]
    html: str | None
    text: str | None
    data: bytes
    images: dict[str, str] = field(default_factory=dict)  # Content-ID: data: URL


def message_view(data: bytes) -> MessageView:
    """Parse RFC 5322 bytes into what the message page needs."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return MessageView(
        subject=str(msg.get("Subject", "")),
        sender=str(msg.get("From", "")),
        to=", ".join(str(v) for v in msg.get_all("To", [])),
        date=str(msg.get("Date", "")),
        headers=[(name, str(value)) for name, value in msg.items()],
        html=_body(msg, "html"),
        text=_body(msg, "plain"),
        data=data,
        images=_inline_images(msg),
    )


def _inline_images(msg: EmailMessage) -> dict[str, str]:
    """Each part with a Content-ID as a data: URL: the preview's iframe may load nothing else,
    and a mail client shows these parts where the HTML says `cid:`."""
    images = {}
    for part in msg.walk():
        content_id = part.get("Content-ID")
        payload = part.get_payload(decode=True)
        if content_id and isinstance(payload, bytes):
            encoded = base64.b64encode(payload).decode("ascii")
            images[str(content_id).strip().strip("<>")] = (
                f"data:{part.get_content_type()};base64,{encoded}"
            )
    return images


def _with_images(html: str, images: dict[str, str]) -> str:
    """`cid:` URLs in the HTML replaced by their parts' data: URLs."""
    for content_id, url in images.items():
        html = html.replace(f"cid:{content_id}", url)
    return html


def _body(msg: EmailMessage, subtype: str) -> str | None:
    part = msg.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_subtype() != subtype:
        return None
    content = part.get_content()
    return content if isinstance(content, str) else None


class PreviewApp:
    """Routes a path to a page. Independent of the HTTP server, so it stays easy to follow."""

    def __init__(self, settings: Settings, outbox: Outbox | None = None) -> None:
        self.renderer = Renderer(
            settings.templates.dir,
            settings.mail.from_,
            auto_reload=True,
            locale=settings.templates.locale,
        )
        self.outbox = outbox
        # With an Outbox, the dev daemon's spool too: what it could not deliver is shown there.
        self.spool = settings.spool if outbox is not None else None
        self._lock = threading.Lock()  # one render at a time: Jinja's cache is shared
        self._pages = jinja2.Environment(
            loader=jinja2.PackageLoader("dispatcher", "ui"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._pages.globals.update(quote=_quote, has_outbox=outbox is not None)
        self._routes: list[tuple[tuple[str, ...], Callable[..., Response]]] = [
            ((), self.index),
            (("version",), self.version),
            (("static", "*"), self.static),
            (("templates", "*"), self.template),
            (("templates", "*", "*"), self.sample),
            (("templates", "*", "*", "*"), self.sample),
            (("outbox",), self.outbox_list),
            (("outbox", "*"), self.captured),
            (("outbox", "*", "*"), self.captured),
        ]

    def handle(self, target: str) -> Response:
        """Answer a GET for `target`; `*` in a route's pattern passes that path segment on."""
        path = urlsplit(target).path
        segments = tuple(unquote(s) for s in path.strip("/").split("/") if s)
        for pattern, route in self._routes:
            if len(pattern) == len(segments) and all(
                p in ("*", s) for p, s in zip(pattern, segments, strict=True)
            ):
                args = [s for p, s in zip(pattern, segments, strict=True) if p == "*"]
                try:
                    return route(*args)
                except NotFound as exc:
                    return self._page("notfound.html", HTTPStatus.NOT_FOUND, what=str(exc))
        return self._page("notfound.html", HTTPStatus.NOT_FOUND, what=path)

    # -- pages -------------------------------------------------------------------------

    def index(self) -> Response:
        templates = []
        for name in self.renderer.template_names():
            samples, error = self._samples(name)
            locales = self._locales(name)
            templates.append(
                {"name": name, "samples": list(samples), "error": error, "locales": locales}
            )
        return self._page("index.html", templates=templates, folder=self.renderer.templates_dir)

    def template(self, name: str) -> Response:
        folder = self._template_folder(name)
        samples, error = self._samples(name)
        error = error or self._syntax_error(folder)
        files = self.renderer.files(name)
        return self._page(
            "template.html",
            name=name,
            samples=samples,
            error=error,
            files=files,
            locales=self._locales(name),
        )

    def sample(self, name: str, sample: str, view: str = "desktop") -> Response:
        """One sample as a page (`view` is one of VIEWS), its HTML part (`html`) or `eml`;
        `sample@de-AT` renders it in that locale."""
        shown_as = sample
        sample, _, locale = sample.partition("@")
        self._template_folder(name)
        samples, error = self._samples(name)
        if error is None and sample not in samples:
            raise NotFound(f"sample {sample!r} of template {name!r}")
        data = None
        if error is None:
            try:
                data = self._render(name, samples[sample], locale or None)
            except (TemplateError, InvalidRequest) as exc:
                error = self._error(exc)
        base = f"/templates/{_quote(name)}/{_quote(shown_as)}"
        crumbs = [("Templates", "/"), (name, f"/templates/{_quote(name)}"), (shown_as, None)]
        return self._message(data, view, base, f"{name}-{sample}", error=error, crumbs=crumbs)

    def outbox_list(self) -> Response:
        outbox = self._outbox()
        messages = []
        for message_id in outbox.ids():
            captured = outbox.get(message_id)
            if captured is None:  # deleted between the listing and now
                continue
            view = message_view(captured.data)
            messages.append(
                {
                    "id": message_id,
                    "subject": view.subject,
                    "recipients": ", ".join(captured.recipients),
                    "received": _local_time(captured.received_at),
                }
            )
        failures = [{**failure, "at": _local_time(failure["at"])} for failure in self._failures()]
        return self._page("outbox.html", messages=messages, failures=failures, folder=outbox.folder)

    def captured(self, message_id: str, view: str = "desktop") -> Response:
        """A captured message, shown exactly as a sample is."""
        captured = self._outbox().get(message_id)
        if captured is None:
            raise NotFound(f"captured message {message_id}")
        envelope = (captured.envelope_from, ", ".join(captured.recipients))
        crumbs = [("Outbox", "/outbox"), (_local_time(captured.received_at), None)]
        base = f"/outbox/{message_id}"
        return self._message(
            captured.data, view, base, message_id, envelope=envelope, crumbs=crumbs
        )

    def version(self) -> Response:
        """A token that changes when any template, layout, sample or captured message does."""
        digest = hashlib.sha256()
        for path, stat in _files(self.renderer.templates_dir):
            digest.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
        if self.outbox is not None:
            digest.update(self.outbox.version().encode())
        if self.spool is not None:  # a request died or was rejected: the Outbox says so
            with contextlib.suppress(SpoolError), open_reader(self.spool) as spool:
                digest.update(spool.failures_mark().encode())
        return Response(
            digest.hexdigest()[:16].encode(), "text/plain; charset=utf-8", headers=NO_STORE
        )

    def static(self, name: str) -> Response:
        types = {"preview.css": "text/css; charset=utf-8", "preview.js": "text/javascript"}
        if name not in types:
            raise NotFound(f"/static/{name}")
        data = (Path(__file__).parent / "ui" / name).read_bytes()
        return Response(data, types[name], headers={"Cache-Control": "no-cache"})

    # -- helpers -----------------------------------------------------------------------

    def _page(self, template: str, status: HTTPStatus = HTTPStatus.OK, **values: Any) -> Response:
        values.setdefault("version", self.version().body.decode())
        html = self._pages.get_template(template).render(values)
        return Response(
            html.encode(),
            status=status,
            headers={"Content-Security-Policy": PAGE_CSP, **NO_STORE},
        )

    def _message(
        self, data: bytes | None, view: str, base: str, stem: str, **values: Any
    ) -> Response:
        """The message page in one of its VIEWS, or the message's HTML part, or its .eml.

        `data` is None when the template does not render: the page then shows `error`.
        """
        if view not in (*VIEWS, "html", "eml"):
            raise NotFound(f"{base}/{view}")
        message = None if data is None else message_view(data)
        if view == "eml" and data is not None:
            filename = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) + ".eml"
            disposition = f'attachment; filename="{filename}"'
            headers = {"Content-Disposition": disposition, **NO_STORE}
            return Response(data, "message/rfc822", headers=headers)
        if view == "html" and message is not None and message.html is not None:
            headers = {"Content-Security-Policy": MAIL_CSP, **NO_STORE}
            html = _with_images(message.html, message.images)
            return Response(html.encode(), headers=headers, framable=True)
        if view in ("html", "eml"):
            raise NotFound(f"{base}/{view}: the message does not render or has no HTML part")
        if message is not None and message.html is None and view in ("desktop", "mobile"):
            view = "text"  # a text-only template has nothing to show in the iframe
        values.setdefault("envelope", None)
        values.setdefault("error", None)
        return self._page("message.html", view=message, shown=view, base=base, **values)

    def _samples(self, name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
        """The samples, or none and the error of an unreadable preview.yaml."""
        try:
            return self.renderer.samples(name), None
        except TemplateError as exc:
            return {}, self._error(exc)

    def _syntax_error(self, folder: Path) -> dict[str, Any] | None:
        """The first syntax error in the template's own files: shown on its page even when
        it has no samples, which would otherwise be the only way to see it."""
        with self._lock:
            errors = self.renderer.compile_errors()
        for exc in errors:
            path = (exc.location or "").rpartition(":")[0]
            if path and (self.renderer.templates_dir.parent / path).parent == folder:
                return self._error(exc)
        return None

    def _template_folder(self, name: str) -> Path:
        if not self.renderer.has_template(name):
            raise NotFound(f"template {name!r}")
        return self.renderer.templates_dir / name

    def _render(self, name: str, context: dict[str, Any], locale: str | None) -> bytes:
        with self._lock:
            return self.renderer.render_example(name, context, locale=locale).data

    def _locales(self, name: str) -> list[str]:
        """The template's locales; just the default when its template.yaml does not load (its
        page shows that error)."""
        with self._lock:
            try:
                return self.renderer.locales(name)
            except TemplateError:
                return [self.renderer.default_locale]

    def _failures(self) -> list[dict[str, Any]]:
        """The newest dead requests and rejected frames of the dev daemon: without them, a
        request with a template error would leave no trace in the browser."""
        if self.spool is None:
            return []
        try:
            with open_reader(self.spool) as spool:
                return spool.recent_failures(FAILURES_LISTED)
        except SpoolError:  # no mail sent yet
            return []

    def _outbox(self) -> Outbox:
        if self.outbox is None:
            raise NotFound("the Outbox (it exists under `dispatcher dev`)")
        return self.outbox

    def _error(self, exc: Exception) -> dict[str, Any]:
        """The error line and, when it names a file and line, the template source around it."""
        location = getattr(exc, "location", None)
        source: list[tuple[int, str, bool]] = []
        if location:
            path, _, line = location.rpartition(":")
            if line.isdigit():
                source = _source_lines(self.renderer.templates_dir.parent / path, int(line))
        return {"message": str(exc), "source": source}


def _source_lines(path: Path, line: int) -> list[tuple[int, str, bool]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    first = max(1, line - SOURCE_CONTEXT)
    last = min(len(lines), line + SOURCE_CONTEXT)
    return [(n, lines[n - 1], n == line) for n in range(first, last + 1)]


def _files(folder: Path) -> list[tuple[str, os.stat_result]]:
    """Every file under the templates folder with its stat, hidden ones excluded."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            try:
                found.append((path, os.stat(path)))
            except FileNotFoundError:  # deleted while we walked
                continue
    return found


def _quote(value: str) -> str:
    return quote(value, safe="")


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def host_allowed(host: str | None, port: int) -> bool:
    """Whether a Host header names this server on loopback: a page whose name was rebound to
    127.0.0.1 (DNS rebinding) still sends its own name, and is refused."""
    if host is None:
        return False
    allowed = {f"{name}:{port}" for name in LOOPBACK_NAMES}
    if port == 80:  # a browser leaves the default port out of Host
        allowed.update(LOOPBACK_NAMES)
    return host.strip().lower() in allowed


class _Handler(BaseHTTPRequestHandler):
    """Checks the Host header, then writes out what the app answers; nothing else."""

    app: PreviewApp
    server_version = "dispatcher-preview"

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        """HEAD gets the status and headers GET would, without the body."""
        response = self._response()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in _with_framing(response).items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def _response(self) -> Response:
        assert isinstance(self.server, ThreadingHTTPServer)
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not host_allowed(hosts[0], self.server.server_port):
            return Response(WRONG_HOST, "text/plain; charset=utf-8", HTTPStatus.FORBIDDEN)
        try:
            return self.app.handle(self.path)
        except Exception:  # a bug must show as a 500, not kill the connection silently
            log.exception("preview: error answering %s", self.path)
            return Response(
                b"internal error: see the dispatcher log",
                "text/plain; charset=utf-8",
                HTTPStatus.INTERNAL_SERVER_ERROR,
            )

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("preview: " + format, *args)


def _with_framing(response: Response) -> dict[str, str]:
    """The response's headers, plus the framing ban for all but the preview's own iframe."""
    if response.framable:
        return response.headers
    return {**NO_FRAMING, **response.headers, "X-Frame-Options": "DENY"}


class PreviewServer:
    """The UI on 127.0.0.1:`port` (0 picks a free port), served from a background thread."""

    def __init__(self, settings: Settings, port: int, outbox: Outbox | None = None) -> None:
        handler = type("Handler", (_Handler,), {"app": PreviewApp(settings, outbox)})
        try:
            self._server = ThreadingHTTPServer((HOST, port), handler)
        except OSError as exc:
            raise StartupError(f"--port {port}: cannot serve the preview: {exc.strerror}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(STOP_POLL,), name="preview"
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}/"

    def start(self) -> None:
        self._thread.start()
        log.info("preview on %s", self.url)

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def serve_preview(settings: Settings, port: int) -> None:
    """`dispatcher preview`: serve until SIGINT or SIGTERM."""
    if not settings.templates.dir.is_dir():
        raise StartupError(f"templates.dir: {settings.templates.dir} is not a folder")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = PreviewServer(settings, port)
    server.start()
    try:
        stop.wait()
    finally:
        server.stop()
    log.info("preview stopped")
