"""Templates to bytes: Jinja renders the parts, `dispatcher.mime` writes the message.

Every failure a template author can cause is one `TemplateError` naming `file:line`. The built
header block is scanned back and compared with what was meant (the check that catches
CVE-2024-6923 of the stdlib builder).
"""

import functools
import hashlib
import os
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

import css_inline
import jinja2
import jinja2.sandbox
import yaml

from dispatcher import mime
from dispatcher.address import Address, check_header_text, parse_address
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.wire import TEMPLATE_NAME, VERSION, Request, validate

BODY_FILES = ("body.html", "body.txt")
EXAMPLE_RECIPIENT = "Example Recipient <recipient@example.com>"  # `render`, `check`, preview
# inscriptis writes links as `[text](url)`; mail readers expect `text (url)`.
_MARKDOWN_LINK = re.compile(r"\[([^\[\]]*)\]\(([^()\s]*)\)")
_BLANK_LINES = re.compile(r"\n{3,}")
# A request id may hold ':', which is not atext and makes Python cut the Message-ID short.
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
# Mail clients drop <style> blocks (Gmail clips them, Outlook ignores many rules): every rule that
# can be is copied into `style` attributes. At-rules (@media) cannot be inlined, so they stay in a
# <style> block for the clients that honour them. Nothing is ever fetched: <link> stylesheets are
# dropped, not loaded, so rendering never touches the network.
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")  # where a header block ends
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_MIME_VERSION = mime.literal_field("MIME-Version", "1.0")
_STYLE_TAG = re.compile(r"<style\b", re.IGNORECASE)
_CSS_INLINER = css_inline.CSSInliner(
    load_remote_stylesheets=False, keep_link_tags=False, keep_at_rules=True
)


@dataclass(frozen=True, slots=True)
class Parts:
    """What a template renders to, before any MIME: also what the preview UI shows."""

    subject: str  # one line, not HTML-escaped
    html: str | None  # None when the template has no body.html
    text: str  # body.txt rendered, or derived from the HTML when body.txt is missing


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A message ready for SMTP: the same bytes and Message-ID on every retry."""

    message_id: str
    envelope_from: str
    recipients: tuple[str, ...]
    subject: str
    data: bytes


def template_environment(
    templates_dir: Path,
    *,
    auto_reload: bool,
    kind: type[jinja2.Environment] = jinja2.sandbox.SandboxedEnvironment,
) -> jinja2.Environment:
    """The Jinja environment templates render in.

    Sandboxed: context is untrusted data, and `{{ x.__class__.__mro__ }}` style lookups on it
    must not reach Python internals. Measured cost ~10 us per message, 0.2% of a render with
    its MIME build (`benchmarks/sandbox.py` compares it with `kind=jinja2.Environment`).
    """
    return kind(
        loader=jinja2.FileSystemLoader(templates_dir),
        undefined=jinja2.StrictUndefined,
        # Only file names decide: a subject (.txt) must never come out as `A &amp; B`.
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html", "htm", "xml"), default_for_string=False, default=False
        ),
        auto_reload=auto_reload,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class Renderer:
    """Renders named templates from one folder and builds RFC 5322 messages from requests.

    Compiled templates stay in Jinja's in-memory cache; with `auto_reload=False` (the daemon) a
    cached template costs no file-system access, with `auto_reload=True` (preview, dev) edits show
    up on the next render.
    """

    def __init__(self, templates_dir: Path, mail_from: str, *, auto_reload: bool = False) -> None:
        self.templates_dir = Path(templates_dir).resolve()
        self.mail_from: Address = parse_address(mail_from, "mail.from")
        self._env = template_environment(self.templates_dir, auto_reload=auto_reload)
        self._known: frozenset[str] = frozenset()
        self._auto_reload = auto_reload
        self._body_files: dict[str, tuple[bool, bool]] = {}

    def template_names(self) -> list[str]:
        """Folders holding a body; `_layouts` and hidden folders are not templates."""
        return sorted(self._scan())

    def has_template(self, name: str) -> bool:
        """Called for every request at intake: a set lookup, and a re-scan only on a miss."""
        if name in self._known:
            return True
        return bool(TEMPLATE_NAME.match(name)) and name in self._scan()

    def render_parts(self, name: str, context: dict[str, Any]) -> Parts:
        """Render subject, HTML and text; the text is derived from the HTML without body.txt."""
        has_html, has_text = self._bodies(name)
        subject = " ".join(self._render(f"{name}/subject.txt", context).split())
        where = f"{self.templates_dir.name}/{name}/subject.txt"  # as _where() would write it
        if not subject:
            raise TemplateError("subject is empty", where)
        try:
            check_header_text(subject, "subject")
        except InvalidRequest as exc:
            raise TemplateError(str(exc), where) from None
        html = None
        if has_html:
            html = self._render(f"{name}/body.html", context)
            html = inline_css(html, f"{self.templates_dir.name}/{name}/body.html")
        if has_text:
            text = self._render(f"{name}/body.txt", context)
        elif html is not None:
            text = html_to_text(html)
        else:  # the folder lost its bodies since the last scan
            raise TemplateError(f"unknown template {name!r}")
        return Parts(subject=subject, html=html, text=text)

    def render(self, request: Request, now: datetime | None = None) -> RenderedMessage:
        """Render the request's template and build the full message for SMTP DATA."""
        parts = self.render_parts(request.template, request.context)
        sender = request.sender or self.mail_from
        envelope_from = _ascii_addr_spec(sender.addr_spec)
        left = _NOT_ATEXT.sub(lambda m: f"={ord(m[0]):02X}", request.id)
        message_id = f"<{left}@{envelope_from.rpartition('@')[2]}>"
        moment = now or datetime.now(UTC)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        try:
            fields = self._fields(request, parts, sender, message_id, moment)
            body = _body(parts, request, _boundary_seed(message_id, parts, request))
            data = mime.message(fields, body)
        except ValueError as exc:  # mime refuses what it cannot write correctly
            raise TemplateError(f"cannot build the message: {exc}") from exc
        _check_headers([f.name for f in (*fields, *body.fields)], data, message_id)
        recipients = dict.fromkeys(_ascii_addr_spec(a) for a in request.recipients)
        return RenderedMessage(message_id, envelope_from, tuple(recipients), parts.subject, data)

    def render_example(
        self, name: str, context: dict[str, Any], to: str = EXAMPLE_RECIPIENT
    ) -> RenderedMessage:
        """The full message a request with this context would get: for render, check, preview."""
        request = validate({"v": VERSION, "template": name, "to": to, "context": context})
        return self.render(request)

    def compile_errors(self) -> list[TemplateError]:
        """Compile every template file, layouts included, whether or not a sample reaches it."""
        errors = []
        for template in self._env.list_templates(extensions=("html", "htm", "txt", "xml")):
            if any(part.startswith(".") for part in template.split("/")):
                continue
            try:
                self._env.get_template(template)
            except jinja2.TemplateSyntaxError as exc:
                where = self._where(exc.filename or exc.name, exc.lineno)
                errors.append(TemplateError(exc.message or "syntax error", where))
        return errors

    def samples(self, name: str) -> dict[str, dict[str, Any]]:
        """The named sample contexts of `preview.yaml`, for preview, `check` and tests."""
        path = self._folder(name) / "preview.yaml"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except yaml.YAMLError as exc:
            mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            raise TemplateError(f"invalid YAML: {problem}", self._where(str(path), line)) from None
        if loaded is None:
            return {}
        if not _is_mapping_of_mappings(loaded):
            raise TemplateError(
                "expected a mapping of sample names to contexts, e.g. {default: {name: Ada}}",
                self._where(str(path), None),
            )
        return loaded

    def _scan(self) -> frozenset[str]:
        try:
            entries = list(os.scandir(self.templates_dir))
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        self._known = frozenset(
            entry.name
            for entry in entries
            if TEMPLATE_NAME.match(entry.name)
            and entry.is_dir()
            and any(os.path.isfile(os.path.join(entry.path, body)) for body in BODY_FILES)
        )
        return self._known

    def _bodies(self, name: str) -> tuple[bool, bool]:
        """Whether the template has body.html, body.txt: looked up once per template when
        templates do not reload (the daemon keeps what it loaded, as Jinja's cache does), on
        every render when they do (preview sees a body file appear or go)."""
        found = self._body_files.get(name)
        if found is None:
            folder = self._folder(name)
            found = (os.path.isfile(folder / "body.html"), os.path.isfile(folder / "body.txt"))
            if not self._auto_reload:
                self._body_files[name] = found
        return found

    def _folder(self, name: str) -> Path:
        # TEMPLATE_NAME has no '/', '.' or '..', so the folder cannot be outside templates_dir.
        if not self.has_template(name):
            raise TemplateError(f"unknown template {name!r}")
        return self.templates_dir / name

    def _render(self, template: str, context: dict[str, Any]) -> str:
        """Render one file; whatever goes wrong becomes a TemplateError pointing at file:line."""
        try:
            return self._env.get_template(template).render(context)
        except jinja2.TemplateSyntaxError as exc:
            where = self._where(exc.filename or exc.name, exc.lineno)
            raise TemplateError(exc.message or "syntax error", where) from exc
        except jinja2.TemplateNotFound as exc:
            if exc.name == template:
                where = self._where(str(self.templates_dir / template), None)
                raise TemplateError(f"missing template file {template!r}", where) from exc
            raise TemplateError(f"template not found: {exc.name}", self._traced(exc)) from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(str(exc), self._traced(exc)) from exc
        except Exception as exc:  # a filter or a context object failed: still the template's
            raise TemplateError(f"{type(exc).__name__}: {exc}", self._traced(exc)) from exc

    def _traced(self, exc: BaseException) -> str | None:
        """Where a runtime error happened: the innermost traceback frame that is a template.

        Jinja rewrites tracebacks so that template frames carry the template's file name and the
        template's line number, which is exactly the location a template author needs.
        """
        prefix = str(self.templates_dir) + os.sep
        found = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(prefix):
                found = self._where(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
            tb = tb.tb_next
        return found

    def _where(self, filename: str | None, line: int | None) -> str | None:
        """`templates/welcome/body.html:3`: relative to the templates folder's parent."""
        if not filename:
            return None
        try:
            shown = Path(filename).relative_to(self.templates_dir.parent).as_posix()
        except ValueError:
            shown = filename
        return f"{shown}:{line}" if line else shown

    def _fields(
        self,
        request: Request,
        parts: Parts,
        sender: Address,
        message_id: str,
        moment: datetime,
    ) -> list[mime.Field]:
        """The message's own header fields, in the order the stdlib builder wrote them."""
        fields = [
            _from_field(sender),
            mime.address_field("To", [_ascii_address(a) for a in request.to]),
        ]
        if request.cc:
            fields.append(mime.address_field("Cc", [_ascii_address(a) for a in request.cc]))
        if request.reply_to:
            reply_to = [_ascii_address(a) for a in request.reply_to]
            fields.append(mime.address_field("Reply-To", reply_to))
        # No Bcc header, ever: Bcc recipients exist only in the SMTP envelope.
        fields += [
            mime.text_field("Subject", parts.subject),
            mime.date_field(moment),
            mime.literal_field("Message-ID", message_id),
            _MIME_VERSION,
        ]
        fields += (
            mime.text_field(name, value, encode_long_words=False)
            for name, value in request.headers.items()
        )
        return fields


def _body(parts: Parts, request: Request, seed: str) -> mime.Part:
    """text/plain, or multipart/alternative (text, then HTML), inside multipart/mixed when
    there are attachments. Boundaries are numbered outermost first, as `walk()` used to."""
    boundaries = (f"=_{seed}.{index}" for index in range(2))
    mixed = next(boundaries) if request.attachments else ""
    body = mime.text_part(parts.text, "plain")
    if parts.html is not None:
        html = mime.text_part(parts.html, "html")
        body = mime.multipart("alternative", (body, html), next(boundaries))
    if request.attachments:
        files = (
            mime.attachment_part(a.filename, a.content_type, a.content) for a in request.attachments
        )
        body = mime.multipart("mixed", (body, *files), mixed)
    return body


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `dispatcher check` found: each failure fails the command, warnings do not."""

    templates: int
    failures: list[str]
    warnings: list[str]


def check_templates(renderer: Renderer) -> CheckReport:
    """Compile every template file, then build the full message for every sample context.

    A template without samples is only compiled: rendering it with an empty context would fail
    on its first variable and say nothing useful, so it gets a warning instead.
    """
    failures = [str(exc) for exc in renderer.compile_errors()]
    warnings = []
    names = renderer.template_names()
    for name in names:
        folder = renderer.templates_dir / name
        if (folder / "body.html").is_file() and not (folder / "body.txt").is_file():
            warnings.append(f"{name}: no body.txt; the text part is derived from body.html")
        try:
            samples = renderer.samples(name)
        except TemplateError as exc:
            failures.append(str(exc))
            continue
        if not samples:
            warnings.append(f"{name}: no samples in preview.yaml; compiled but not rendered")
        for sample, context in samples.items():
            try:
                renderer.render_example(name, context)
            except (TemplateError, InvalidRequest) as exc:
                if str(exc) not in failures:  # a compile error fails every sample alike
                    failures.append(f"{exc} [template {name}, sample {sample}]")
    return CheckReport(len(names), failures, warnings)


def inline_css(html: str, where: str | None = None) -> str:
    """The HTML part as mail clients want it: `<style>` rules moved into `style` attributes.

    HTML without a `<style>` block is returned as written: the inliner would re-serialise it
    (wrapping a fragment in `<html><body>`) for nothing.
    """
    if not _STYLE_TAG.search(html):
        return html
    try:
        return _CSS_INLINER.inline(html)
    except ValueError as exc:  # css-inline raises ValueError for CSS it cannot parse
        raise TemplateError(f"cannot inline the CSS: {exc}", where) from exc


def html_to_text(html: str) -> str:
    """A readable text/plain part from the HTML: `text (url)` links, no table padding.

    inscriptis (Apache-2.0) rather than html2text (GPL-3.0); imported here because it pulls in
    lxml and only templates without body.txt need it.
    """
    from inscriptis import get_text
    from inscriptis.model.config import ParserConfig

    raw = str(get_text(html, ParserConfig(display_links=True)))
    text = _MARKDOWN_LINK.sub(_plain_link, raw)
    text = textwrap.dedent("\n".join(line.rstrip() for line in text.splitlines()))
    return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n"


def _plain_link(match: re.Match[str]) -> str:
    label, url = " ".join(match[1].split()), match[2]
    if not url or url.startswith("#"):  # an in-page anchor means nothing in plain text
        return label
    shown = url.removeprefix("mailto:")
    if not label or label in (url, shown):
        return shown
    return f"{label} ({shown})"


def _is_mapping_of_mappings(value: object) -> TypeGuard[dict[str, dict[str, Any]]]:
    return isinstance(value, dict) and all(
        isinstance(sample, str) and isinstance(ctx, dict) and all(isinstance(k, str) for k in ctx)
        for sample, ctx in value.items()
    )


def _ascii_addr_spec(addr_spec: str) -> str:
    """The address with its domain in punycode: what headers and the envelope can carry.

    A non-ASCII local part would need SMTPUTF8, which Python 3.11's header classes cannot write.
    """
    if addr_spec.isascii():
        return addr_spec
    from email_validator import EmailNotValidError, validate_email

    try:
        ascii_email = validate_email(addr_spec, check_deliverability=False).ascii_email
    except EmailNotValidError as exc:
        raise TemplateError(f"cannot build the message: {addr_spec!r}: {exc}") from None
    if not ascii_email:
        raise TemplateError(
            f"cannot build the message: {addr_spec!r} has a non-ASCII local part (needs SMTPUTF8)"
        )
    return str(ascii_email)


@functools.lru_cache(maxsize=64)
def _from_field(sender: Address) -> mime.Field:
    """Cached: nearly every message has the configured sender."""
    return mime.address_field("From", [_ascii_address(sender)])


def _ascii_address(address: Address) -> Address:
    return Address(address.display_name, _ascii_addr_spec(address.addr_spec))


def _boundary_seed(message_id: str, parts: Parts, request: Request) -> str:
    """Boundaries derived from the content, so the same request renders to the same bytes.

    A digest of everything inside the message cannot occur in that content, which is the only
    property a boundary needs; quoted-printable and base64 content cannot hold `=_` at all.
    """
    digest = hashlib.sha256(message_id.encode())
    for text in (parts.subject, parts.text, parts.html or ""):
        digest.update(text.encode("utf-8", "surrogatepass"))
    for attachment in request.attachments:
        digest.update(attachment.filename.encode("utf-8", "surrogatepass") + attachment.content)
    return digest.hexdigest()[:32]


def _check_headers(written: Sequence[str], data: bytes, message_id: str) -> None:
    """Split the serialised header block into fields as a mail reader would: it must hold
    exactly the fields we wrote, and the Message-ID we meant.

    `mime` cannot start a header line from a value (see its docstring); this scan (a few
    microseconds, no email package) is the second line of defence against a builder bug of the
    CVE-2024-6923 kind (an encoded newline turning into a real header line). Every one of
    CR LF, CR and LF counts as a line break here, as it does for the stdlib parser.
    """
    end = data.find(b"\r\n\r\n")
    block = data[:end] if end >= 0 else data
    id_line = b"\r\nMessage-ID: " + message_id.encode("ascii", "replace") + b"\r\n"
    if block.count(b"\r\n") == block.count(b"\r") == block.count(b"\n"):
        # CRLF is the only line break (what mime writes): count the lines that start a field.
        field_count = 1 + block.count(b"\r\n") - block.count(b"\r\n ") - block.count(b"\r\n\t")
        if field_count == len(written) and id_line in block + b"\r\n":
            return
        lines = block.split(b"\r\n")
    else:  # a bare CR or LF: split where a mail reader would, and end where it would
        blank = _BLANK_LINE.search(data)
        lines = _LINE_BREAK.split(data[: blank.start()] if blank else data)
    field_lines = [line for line in lines if line[:1] not in b" \t"]  # not continuations
    came = [line.partition(b":")[0].strip().lower() for line in field_lines]
    meant = [name.lower().encode("ascii", "replace") for name in written]
    if sorted(came) != sorted(meant):
        extra = sorted(n.decode("ascii", "replace") for n in (Counter(came) - Counter(meant)))
        missing = sorted(n.decode("ascii", "replace") for n in (Counter(meant) - Counter(came)))
        raise TemplateError(f"header check failed: unexpected {extra}, missing {missing}")
    written_id = field_lines[came.index(b"message-id")].partition(b":")[2].strip()
    if written_id != message_id.encode("ascii", "replace"):
        raise TemplateError(f"header check failed: Message-ID came out as {written_id!r}")
