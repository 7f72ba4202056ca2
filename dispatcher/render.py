"""Templates: Jinja renders a template folder to its parts (subject, HTML, text).

Every failure a template author can cause is one `TemplateError` naming `file:line`, so
`dispatcher check`, the preview and a dead request's reason read like a compiler error.
"""

import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeGuard

import css_inline
import jinja2
import jinja2.sandbox
import yaml
from jinja2.loaders import split_template_path

from dispatcher.address import Address, check_header_text, parse_address
from dispatcher.compose import Parts, RenderedMessage, compose
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.wire import TEMPLATE_NAME, VERSION, Request, validate

BODY_FILES = ("body.html", "body.txt")
EXAMPLE_RECIPIENT = "Example Recipient <recipient@example.com>"  # `render`, `check`, preview
# inscriptis writes links as `[text](url)`; mail readers expect `text (url)`.
_MARKDOWN_LINK = re.compile(r"\[([^\[\]]*)\]\(([^()\s]*)\)")
_BLANK_LINES = re.compile(r"\n{3,}")
# Mail clients drop <style> blocks (Gmail clips them, Outlook ignores many rules): every rule that
# can be is copied into `style` attributes. At-rules (@media) cannot be inlined, so they stay in a
# <style> block for the clients that honour them. Nothing is ever fetched: <link> stylesheets are
# dropped, not loaded, so rendering never touches the network.
_STYLE_TAG = re.compile(r"<style\b", re.IGNORECASE)
_CSS_INLINER = css_inline.CSSInliner(
    load_remote_stylesheets=False, keep_link_tags=False, keep_at_rules=True
)


class ConfinedLoader(jinja2.FileSystemLoader):
    """Jinja's file loader, refusing any file that resolves outside the templates folder.

    Jinja follows symlinks: a template folder, file or layout linked out of `templates.dir`
    would otherwise let a template author read any file the daemon can.
    """

    def __init__(self, templates_dir: Path) -> None:
        self.root = Path(templates_dir).resolve()
        super().__init__(self.root)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        path = Path(self.root, *split_template_path(template))
        if os.path.lexists(path):  # checked before reading: a link to /dev/zero never returns
            ensure_inside(path, self.root)
        return super().get_source(environment, template)


def ensure_inside(path: Path, templates_dir: Path) -> None:
    """Raise a TemplateError naming `path` if it resolves outside `templates_dir` (resolved)."""
    if not path.resolve().is_relative_to(templates_dir):
        where = relative_location(str(path), templates_dir)
        raise TemplateError("points outside the templates folder: refused", where)


def relative_location(filename: str, templates_dir: Path) -> str:
    """`templates/welcome/body.html`: relative to the templates folder's parent when it can be."""
    try:
        return Path(filename).relative_to(templates_dir.parent).as_posix()
    except ValueError:
        return filename


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
        loader=ConfinedLoader(templates_dir),
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
    """Renders named templates from one folder; `render` also composes the full message.

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
        assert request.template is not None, "message.render_request() takes the other kinds"
        parts = self.render_parts(request.template, request.context)
        return compose(parts, request, request.sender or self.mail_from, now)

    def render_example(
        self, name: str, context: dict[str, Any], to: str = EXAMPLE_RECIPIENT
    ) -> RenderedMessage:
        """The full message a request with this context would get: for render, check, preview."""
        request = validate({"v": VERSION, "template": name, "to": to, "context": context})
        return self.render(request)

    def compile_errors(self) -> list[TemplateError]:
        """Compile every template file, layouts included, whether or not a sample reaches it."""
        errors = self.outside_links()
        for template in self._env.list_templates(extensions=("html", "htm", "txt", "xml")):
            if any(part.startswith(".") for part in template.split("/")):
                continue
            try:
                self._env.get_template(template)
            except jinja2.TemplateSyntaxError as exc:
                where = self._where(exc.filename or exc.name, exc.lineno)
                errors.append(TemplateError(exc.message or "syntax error", where))
            except TemplateError:  # a link out of the folder: outside_links() reported it
                continue
        return errors

    def outside_links(self) -> list[TemplateError]:
        """Each symlink in the templates folder that points outside it: one error per link,
        found without following it (Jinja's listing would walk into the folder it points at)."""
        errors = []
        for root, dirs, files in os.walk(self.templates_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(dirs + files):
                path = Path(root, name)
                if name.startswith(".") or not path.is_symlink():
                    continue
                try:
                    ensure_inside(path, self.templates_dir)
                except TemplateError as exc:
                    errors.append(exc)
        return errors

    def samples(self, name: str) -> dict[str, dict[str, Any]]:
        """The named sample contexts of `preview.yaml`, for preview, `check` and tests."""
        path = self._folder(name) / "preview.yaml"
        if os.path.lexists(path):
            ensure_inside(path, self.templates_dir)
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
        ensure_inside(self.templates_dir / name, self.templates_dir)
        return self.templates_dir / name

    def files(self, name: str) -> list[str]:
        """The template's own file names, for the preview; none for a folder linked outside."""
        try:
            folder = self._folder(name)
        except TemplateError:
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file())

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
        except TemplateError:  # the loader refused a file outside the templates folder
            raise
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
        shown = relative_location(filename, self.templates_dir)
        return f"{shown}:{line}" if line else shown


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
            if str(exc) not in failures:  # a folder linked outside: outside_links() said so
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
