"""Templates: Jinja renders a template folder to its parts (subject, HTML, text).

Every failure a template author can cause is one `TemplateError` naming `file:line`, so
`dispatcher check`, the preview and a dead request's reason read like a compiler error.
"""

import dataclasses
import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import jinja2
import jinja2.sandbox
import yaml
from jinja2.loaders import split_template_path

from dispatcher import locales, styles, template_defaults
from dispatcher.address import Address, check_header_text, parse_address
from dispatcher.compose import Parts, RenderedMessage, compose
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.inline import InlineImages
from dispatcher.inline import image as inline_image
from dispatcher.settings import DkimSettings
from dispatcher.template_defaults import TemplateDefaults
from dispatcher.wire import TEMPLATE_NAME, VERSION, Attachment, Request, validate

BODY_FILES = ("body.html", "body.txt")
LAYOUTS = "_layouts"
SAMPLE_LOCALE = "_locale"  # a preview.yaml sample's key naming the locale it renders in
SAMPLE_TIMEZONE = "_timezone"
EXAMPLE_RECIPIENT = "Example Recipient <recipient@example.com>"  # `render`, `check`, preview
# inscriptis writes links as `[text](url)`; mail readers expect `text (url)`.
_MARKDOWN_LINK = re.compile(r"\[([^\[\]]*)\]\(([^()\s]*)\)")
_BLANK_LINES = re.compile(r"\n{3,}")


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
    kind: type[jinja2.Environment] = locales.LocalizedEnvironment,
) -> jinja2.Environment:
    """The Jinja environment templates render in.

    Sandboxed: context is untrusted data, and `{{ x.__class__.__mro__ }}` style lookups on it
    must not reach Python internals. `benchmarks/sandbox.py` measures what that costs against
    `kind=jinja2.Environment`.
    The i18n extension serves teams with gettext catalogs; its callables come per render.
    """
    env = kind(
        loader=ConfinedLoader(templates_dir),
        extensions=["jinja2.ext.i18n"],
        undefined=jinja2.StrictUndefined,
        # Only file names decide: a subject (.txt) must never come out as `A &amp; B`.
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html", "htm", "xml"), default_for_string=False, default=False
        ),
        auto_reload=auto_reload,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=styles.hollow,  # values as they are, except in a page `styles.Inliner` shapes
    )
    # The i18n callables come in each render's context (its catalog, or none): a global costs
    # a ChainMap look-up in every context Jinja makes, three per mail.
    del env.globals["_"]
    env.filters.update(locales.FILTERS)
    return env


class _Plan(NamedTuple):
    """How one template renders in one locale: its files, and what the render's context gets."""

    chain: tuple[str, ...]  # the locales files and layouts are looked up along
    locale: str  # the mail's: formatting and <html lang>
    subject: str
    html: str | None
    text: str | None
    gettext: dict[str, Any]  # the i18n extension's callables of its catalog, if it has one


class Renderer:
    """Renders named templates from one folder; `render` also composes the full message.

    Compiled templates stay in Jinja's in-memory cache; with `auto_reload=False` (the daemon) a
    cached template costs no file-system access, with `auto_reload=True` (preview, dev) edits show
    up on the next render.
    """

    def __init__(
        self,
        templates_dir: Path,
        mail_from: str,
        *,
        auto_reload: bool = False,
        locale: str = "en",
        dkim: DkimSettings | None = None,
    ) -> None:
        """`locale`: of requests that name none; `dkim`: sign what `signed()` is given."""
        self.templates_dir = Path(templates_dir).resolve()
        self.mail_from: Address = parse_address(mail_from, "mail.from")
        self.default_locale = locales.normalize(locale)
        self._env = template_environment(self.templates_dir, auto_reload=auto_reload)
        self._variants = locales.Variants(self.templates_dir, auto_reload=auto_reload)
        if isinstance(self._env, locales.LocalizedEnvironment):
            self._env.variants = self._variants
        self._catalogs = locales.Catalogs(self.templates_dir, auto_reload=auto_reload)
        # Shapes only where templates cannot change under them, and where every file a page
        # uses is seen (`LocalizedEnvironment.join_path` tells).
        keep_shapes = not auto_reload and isinstance(self._env, locales.LocalizedEnvironment)
        self._styles = styles.Inliner(self._env, keep_shapes=keep_shapes)
        self._known: frozenset[str] = frozenset()
        self._auto_reload = auto_reload
        self._defaults: dict[str, TemplateDefaults] = {}
        self._plans: dict[tuple[str, str | None], _Plan] = {}
        self._images: dict[Path, Attachment] = {}
        self.signer = None
        if dkim is not None:
            from dispatcher.dkim import Signer

            self.signer = Signer(dkim)

    def template_names(self) -> list[str]:
        """Folders holding a body; `_layouts` and hidden folders are not templates."""
        return sorted(self._scan())

    def has_template(self, name: str) -> bool:
        """Called for every request at intake: a set lookup, and a re-scan only on a miss."""
        if name in self._known:
            return True
        return bool(TEMPLATE_NAME.match(name)) and name in self._scan()

    def render_parts(
        self,
        name: str,
        context: dict[str, Any],
        *,
        locale: str | None = None,
        timezone: str | None = None,
    ) -> Parts:
        """Render subject, HTML and text, each from its variant for `locale` (else the
        template's or the default locale); the text is derived from the HTML without a
        body.txt."""
        plan = self._plans.get((name, locale)) or self._plan(name, locale)
        images = InlineImages(lambda filename: self._inline_file(name, filename))
        context = {
            **context,
            "locale": plan.locale,
            "timezone": timezone,
            "inline": images,
            **plan.gettext,
        }
        token = locales.current_chain.set(plan.chain)
        try:
            return self._parts(name, plan, context, images)
        finally:
            locales.current_chain.reset(token)

    def _parts(
        self, name: str, plan: "_Plan", context: dict[str, Any], images: InlineImages
    ) -> Parts:
        subject = " ".join(self._render(plan.subject, context).split())
        where = f"{self.templates_dir.name}/{plan.subject}"  # as _where() would write it
        if not subject:
            raise TemplateError("subject is empty", where)
        try:
            check_header_text(subject, "subject")
        except InvalidRequest as exc:
            raise TemplateError(str(exc), where) from None
        html = None
        if (page := plan.html) is not None:
            html = self._styles.page(
                page, lambda: self._render(page, context), f"{self.templates_dir.name}/{page}"
            )
        if plan.text is not None:
            text = self._render(plan.text, context)
        elif html is not None:
            text = html_to_text(html)
        else:  # the folder lost its bodies since the last scan
            raise TemplateError(f"unknown template {name!r}")
        return Parts(subject=subject, html=html, text=text, inline=tuple(images.images.values()))

    def _plan(self, name: str, asked: str | None) -> "_Plan":
        """Which files a mail in locale `asked` renders, and the locale it is written in: the
        one asked for when the template has a variant or catalog on its chain, else the
        default, so that a mail falling back to the default text is formatted to match.
        Kept unless templates reload, as Jinja keeps what it compiled."""
        default = locales.normalize(self.defaults(name).locale or self.default_locale)
        chain = locales.chain(asked or default)
        subject, html, text = (
            self._variants.find(f"{name}/{file}", chain) for file in ("subject.txt", *BODY_FILES)
        )
        catalog = self._catalogs.get(chain)
        localized = catalog is not None or any(
            found is not None and not found.endswith(("/subject.txt", "/body.html", "/body.txt"))
            for found in (subject, html, text)
        )
        plan = _Plan(
            chain,
            chain[0] if asked is None or localized else default,
            subject or f"{name}/subject.txt",
            html,
            text,
            {} if catalog is None else locales.gettext_callables(catalog),
        )
        if not self._auto_reload:
            if len(self._plans) >= locales.MAX_CACHED:
                self._plans.clear()
            self._plans[name, asked] = plan
        return plan

    def locales(self, name: str) -> list[str]:
        """The locales the template has variants or catalogs for, its default first."""
        default = locales.normalize(self.defaults(name).locale or self.default_locale)
        found = locales.file_locales(self._folder(name)) + self._catalogs.locales()
        return list(dict.fromkeys((default, *sorted(found))))

    def tagged(self, tag: str) -> list[str]:
        """The templates whose template.yaml gives `tag` (one that does not load gives none)."""
        found = []
        for name in self.template_names():
            try:
                if tag in self.defaults(name).tags:
                    found.append(name)
            except TemplateError:
                continue
        return found

    def defaults(self, name: str) -> TemplateDefaults:
        """The template's template.yaml, read once unless templates reload."""
        found = self._defaults.get(name)
        if found is None:
            folder = self._folder(name)
            if os.path.lexists(folder / template_defaults.FILE):
                ensure_inside(folder / template_defaults.FILE, self.templates_dir)
            where = f"{self.templates_dir.name}/{name}/{template_defaults.FILE}"
            found = template_defaults.load(folder, where)
            if not self._auto_reload:
                self._defaults[name] = found
        return found

    def _inline_file(self, name: str, filename: str) -> Attachment:
        """An image `inline()` names: in the template's folder, else in _layouts/, never
        outside the templates folder."""
        for folder in (self.templates_dir / name, self.templates_dir / LAYOUTS):
            path = folder / filename
            if path in self._images:
                return self._images[path]
            if not os.path.lexists(path):
                continue
            ensure_inside(path, self.templates_dir)
            if path.is_file():
                found = inline_image(filename, path.read_bytes())
                if not self._auto_reload:
                    self._images[path] = found
                return found
        raise ValueError(f"inline: no file {filename!r} in {name}/ or {LAYOUTS}/")

    def render(self, request: Request, now: datetime | None = None) -> RenderedMessage:
        """Render the request's template, with its template.yaml defaults, and build the full
        message for SMTP DATA."""
        template = request.template
        assert template is not None, "message.render_request() takes the other kinds"
        request = self.defaults(template).apply(request)
        parts = self.render_parts(
            template, request.context, locale=request.locale, timezone=request.timezone
        )
        return compose(parts, request, request.sender or self.mail_from, now)

    def signed(self, message: RenderedMessage) -> RenderedMessage:
        """The message as it is sent: DKIM-signed when `dkim` is set and its From matches."""
        if self.signer is None:
            return message
        return dataclasses.replace(message, data=self.signer.sign(message.data))

    def render_example(
        self,
        name: str,
        context: dict[str, Any],
        to: str = EXAMPLE_RECIPIENT,
        locale: str | None = None,
    ) -> RenderedMessage:
        """The full message a request with this context would get: for render, check, preview.

        A sample's `_locale` and `_timezone` keys become the request's locale and timezone;
        `locale`, when given, wins over the sample's."""
        context, sample_locale, timezone = split_sample(context)
        fields = {
            "v": VERSION,
            "template": name,
            "to": to,
            "locale": locale or sample_locale,
            "timezone": timezone,
            "context": context,
        }
        return self.render(validate({k: v for k, v in fields.items() if v is not None}))

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


def split_sample(context: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """A preview.yaml sample as (context, locale, timezone): its `_locale` and `_timezone`
    keys are the request's, not the template's."""
    rest = {k: v for k, v in context.items() if k not in (SAMPLE_LOCALE, SAMPLE_TIMEZONE)}
    return rest, context.get(SAMPLE_LOCALE), context.get(SAMPLE_TIMEZONE)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `dispatcher check` found: each failure fails the command, warnings do not."""

    templates: int
    failures: list[str]
    warnings: list[str]


def check_templates(renderer: Renderer) -> CheckReport:
    """Compile every template file, check each template.yaml, then build the full message for
    every sample context in every locale the template has.

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
            locales_of = renderer.locales(name)  # reads template.yaml: its errors fail here
        except TemplateError as exc:
            if str(exc) not in failures:  # a folder linked outside: outside_links() said so
                failures.append(str(exc))
            continue
        if not samples:
            warnings.append(f"{name}: no samples in preview.yaml; compiled but not rendered")
        for sample, context in samples.items():
            own = context.get(SAMPLE_LOCALE)
            tried = dict.fromkeys([*locales_of, *([own] if isinstance(own, str) else [])])
            for locale in tried:
                try:
                    renderer.render_example(name, context, locale=locale)
                except (TemplateError, InvalidRequest) as exc:
                    shown = f", locale {locale}" if len(tried) > 1 else ""
                    if str(exc) not in failures:  # a compile error fails every sample alike
                        failures.append(f"{exc} [template {name}, sample {sample}{shown}]")
    return CheckReport(len(names), failures, warnings)


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
