"""Locales: which file variant a mail uses, and dates, numbers and money written for its reader.

A template file `body.html` may have variants `body.de.html`, `body.de-AT.html`; a mail in
`de-AT` takes, per file, the first of `body.de-AT.html`, `body.de.html`, `body.html` that
exists. Layouts follow the same rule when a template extends them. Formatting is Babel's (CLDR
data), imported on first use so that neither the client nor a template without these filters
pays for it.
"""

import contextvars
import functools
import gettext
import os
import re
from collections.abc import Callable, MutableMapping
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from dispatcher import styles

if TYPE_CHECKING:
    from babel.core import Locale
    from babel.support import Translations

LOCALES_DIR = "_locales"
# Entries a look-up cache keeps before it starts again: requests choose their locale, so a flood
# of made-up ones must not grow the daemon without bound.
MAX_CACHED = 4096  # gettext catalogs: _locales/<locale>/LC_MESSAGES/messages.mo
# `subject.de-AT.txt`: a template file's name with a locale between stem and extension.
VARIANT = re.compile(r"\A(?:subject|body)\.([A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8})*)\.(?:txt|html)\Z")
# The locale chain of the render in progress: layouts are looked up along it (see join_path).
current_chain: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "current_chain", default=()
)


@functools.lru_cache(maxsize=256)
def normalize(tag: str) -> str:
    """`de_at` → `de-AT`, `zh_hant_tw` → `zh-Hant-TW`: one spelling, as files are named."""
    language, *rest = re.split(r"[-_]", tag)
    parts = [language.lower()]
    for part in rest:
        if len(part) == 4 and part.isalpha():
            parts.append(part.title())  # a script
        elif len(part) == 2 and part.isalpha():
            parts.append(part.upper())  # a region
        else:
            parts.append(part)
    return "-".join(parts)


@functools.lru_cache(maxsize=256)
def chain(tag: str) -> tuple[str, ...]:
    """The fallback chain of a locale, most specific first: `de-AT` → (`de-AT`, `de`)."""
    parts = normalize(tag).split("-")
    return tuple("-".join(parts[:end]) for end in range(len(parts), 0, -1))


def variant(relative: str, tag: str) -> str:
    """`welcome/body.html` in `de` → `welcome/body.de.html`."""
    stem, dot, extension = relative.rpartition(".")
    return f"{stem}.{tag}.{extension}" if dot else f"{relative}.{tag}"


def file_locales(folder: Path) -> list[str]:
    """The locales a template folder has subject or body variants for, sorted."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted({normalize(m[1]) for n in names if (m := VARIANT.match(n))})


class Variants:
    """Finds the variant of a template file for a locale chain; remembers what it found
    unless templates reload (the daemon), as Jinja's own cache does."""

    def __init__(self, templates_dir: Path, *, auto_reload: bool) -> None:
        self.templates_dir = templates_dir
        self._found: dict[tuple[str, tuple[str, ...]], str | None] | None = (
            None if auto_reload else {}
        )

    def find(self, relative: str, locales: tuple[str, ...]) -> str | None:
        """The first of `relative`'s variants along `locales`, then `relative`; None if none
        of them is a file."""
        key = (relative, locales)
        if self._found is not None and key in self._found:
            return self._found[key]
        found = next(
            (
                name
                for name in (*(variant(relative, tag) for tag in locales), relative)
                if os.path.isfile(self.templates_dir / name)
            ),
            None,
        )
        if self._found is not None:
            if len(self._found) >= MAX_CACHED:
                self._found.clear()
            self._found[key] = found
        return found


class LocalizedContext(jinja2.runtime.Context):
    """A render's variables, and gettext's callables when the render has no catalog: Jinja's
    documented hook, so that no render pays for copying them into its context."""

    def resolve_or_missing(self, key: str) -> Any:
        # Jinja's own two look-ups, written out: every variable of every render comes here,
        # and a call to super() would cost more than the look-ups.
        if key in self.vars:
            return self.vars[key]
        if key in self.parent:
            return self.parent[key]
        return NO_CATALOG.get(key, jinja2.utils.missing)


class LocalizedEnvironment(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox, with `{% extends %}` and `{% include %}` resolved to the variant of the
    named file for the locale chain of the render in progress, and gettext without a catalog
    leaving strings as written."""

    context_class = LocalizedContext
    variants: Variants | None = None

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        """A plain dict rather than Jinja's ChainMap: each of a mail's three contexts copies
        its template's globals, and a ChainMap costs a Python call per global. Globals are
        set before any template loads, as Jinja asks, so a snapshot sees the same."""
        return {**self.globals, **(d or {})}

    def join_path(self, template: str, parent: str) -> str:
        locales = current_chain.get()
        if locales and self.variants is not None:
            template = self.variants.find(template, locales) or template
        styles.note_template(template)  # every file a page uses, for the CSS inliner
        return template


# -- formatting --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def babel_locale(tag: str) -> "Locale":
    """Babel's locale for a tag, falling back along its chain, then to English: a locale
    CLDR lacks still renders."""
    from babel.core import Locale, UnknownLocaleError

    for candidate in chain(tag):
        try:
            return Locale.parse(candidate.replace("-", "_"))
        except (UnknownLocaleError, ValueError):
            continue
    return Locale.parse("en")


@functools.lru_cache(maxsize=64)
def zone(name: str | None) -> tzinfo:
    """The tzinfo of an IANA name (wire checked it); UTC without one."""
    if name is None:
        return UTC
    import zoneinfo

    return zoneinfo.ZoneInfo(name)


def _moment(value: object, name: str) -> datetime | date:
    """A context value as a date or an aware datetime: JSON carries them as ISO 8601 text."""
    if isinstance(value, str):
        parse = datetime.fromisoformat if "T" in value or " " in value else date.fromisoformat
        try:
            value = parse(value)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not an ISO 8601 date or time") from None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return value
    raise ValueError(f"{name}: expected a date or time, got {type(value).__name__}")


def _amount(value: object, name: str) -> Decimal | int | float:
    """A context value as a number: JSON may carry a Decimal as text ("12.50")."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got a boolean")
    if isinstance(value, int | float | Decimal):
        return value
    if isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            pass
    raise ValueError(f"{name}: {value!r} is not a number")


def _where(context: jinja2.runtime.Context) -> tuple["Locale", tzinfo]:
    return babel_locale(context.get("locale") or "en"), zone(context.get("timezone"))


@jinja2.pass_context
def format_datetime(context: jinja2.runtime.Context, value: object, format: str = "medium") -> str:
    """`{{ order.placed | datetime }}`: date and time in the mail's locale and time zone."""
    from babel import dates

    locale, tz = _where(context)
    moment = _moment(value, "datetime")
    if not isinstance(moment, datetime):
        moment = datetime.combine(moment, time(), UTC)
    return str(dates.format_datetime(moment, format, tzinfo=tz, locale=locale))


@jinja2.pass_context
def format_date(context: jinja2.runtime.Context, value: object, format: str = "medium") -> str:
    """`{{ order.placed | date }}`, `{{ day | date("full") }}`: the date in the mail's zone."""
    from babel import dates

    locale, tz = _where(context)
    moment = _moment(value, "date")
    if isinstance(moment, datetime):
        moment = moment.astimezone(tz).date()
    return str(dates.format_date(moment, format, locale=locale))


@jinja2.pass_context
def format_time(context: jinja2.runtime.Context, value: object, format: str = "short") -> str:
    """`{{ slot.start | time }}`: the time of day in the mail's locale and time zone."""
    from babel import dates

    locale, tz = _where(context)
    moment = _moment(value, "time")
    if not isinstance(moment, datetime):
        raise ValueError(f"time: {value!r} has no time of day")
    return str(dates.format_time(moment, format, tzinfo=tz, locale=locale))


@jinja2.pass_context
def format_number(context: jinja2.runtime.Context, value: object) -> str:
    """`{{ count | number }}`: digits grouped as the locale writes them (1.234,5 in de)."""
    from babel import numbers

    return str(numbers.format_decimal(_amount(value, "number"), locale=_where(context)[0]))


@jinja2.pass_context
def format_currency(context: jinja2.runtime.Context, value: object, currency: str) -> str:
    """`{{ total | currency("EUR") }}`: 1.234,50 € in de, €1,234.50 in en."""
    from babel import numbers

    amount = _amount(value, "currency")
    return str(numbers.format_currency(amount, currency, locale=_where(context)[0]))


@jinja2.pass_context
def format_percent(context: jinja2.runtime.Context, value: object) -> str:
    """`{{ 0.25 | percent }}`: 25 % in de, 25% in en."""
    from babel import numbers

    return str(numbers.format_percent(_amount(value, "percent"), locale=_where(context)[0]))


FILTERS: dict[str, Callable[..., str]] = {
    "datetime": format_datetime,
    "date": format_date,
    "time": format_time,
    "number": format_number,
    "currency": format_currency,
    "percent": format_percent,
}


# -- gettext catalogs --------------------------------------------------------------------------


class Catalogs:
    """Compiled gettext catalogs under `templates/_locales/`, for Jinja's i18n extension
    (`{% trans %}`, `{{ _("...") }}`); none there costs one stat per render."""

    def __init__(self, templates_dir: Path, *, auto_reload: bool) -> None:
        self.folder = templates_dir / LOCALES_DIR
        self._cache: dict[tuple[str, ...], Translations | None] | None = None if auto_reload else {}

    def locales(self) -> list[str]:
        """The locales that have a catalog."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        return sorted(
            normalize(n)
            for n in names
            if os.path.isfile(self.folder / n / "LC_MESSAGES" / "messages.mo")
        )

    def get(self, locales: tuple[str, ...]) -> "Translations | None":
        """The catalog of the first locale along `locales` that has one (others fill its gaps)."""
        if self._cache is not None and locales in self._cache:
            return self._cache[locales]
        found = None
        if os.path.isdir(self.folder):
            from babel.support import Translations

            names = [tag.replace("-", "_") for tag in locales]
            loaded = Translations.load(str(self.folder), names)
            found = loaded if isinstance(loaded, Translations) else None
        if self._cache is not None:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[locales] = found
        return found


def gettext_callables(translations: "gettext.NullTranslations") -> dict[str, Any]:
    """What the i18n extension calls, bound to one catalog: passed in the render's context,
    so one environment serves every locale without swapping globals."""
    return {
        "gettext": translations.gettext,
        "_": translations.gettext,
        "ngettext": translations.ngettext,
        "pgettext": translations.pgettext,
        "npgettext": translations.npgettext,
    }


NO_CATALOG = gettext_callables(gettext.NullTranslations())  # strings stay as written
