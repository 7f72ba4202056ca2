"""`templates/<name>/template.yaml`: what every mail of one template gets unless its request
says otherwise (sender, Reply-To, extra headers, tags, locale, unsubscribe URL).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dispatcher.address import Address, parse_address
from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.wire import LOCALE, Request, _addresses, _headers, check_tags, check_unsubscribe_url

FILE = "template.yaml"
KEYS = ("from", "reply_to", "headers", "tags", "locale", "unsubscribe_url")


@dataclass(frozen=True, slots=True)
class TemplateDefaults:
    """One template's defaults, checked by the rules requests are checked with."""

    sender: Address | None = None
    reply_to: tuple[Address, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    locale: str | None = None
    unsubscribe_url: str | None = None

    def apply(self, request: Request) -> Request:
        """The request with these defaults where it has no value of its own; tags are added
        to its own, headers it sets itself win by name."""
        if self is NONE:  # most templates have no template.yaml: no copy of the request
            return request
        own_headers = {name.lower() for name in request.headers}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in own_headers}
        unsubscribe = request.unsubscribe_url
        if unsubscribe is None and "list-unsubscribe" not in own_headers:
            unsubscribe = self.unsubscribe_url
        return dataclasses.replace(
            request,
            sender=request.sender or self.sender,
            reply_to=request.reply_to or self.reply_to,
            headers={**headers, **request.headers},
            tags=tuple(dict.fromkeys((*self.tags, *request.tags))),
            locale=request.locale or self.locale,
            unsubscribe_url=unsubscribe,
        )


NONE = TemplateDefaults()


def load(folder: Path, where: str) -> TemplateDefaults:
    """The defaults in `folder/template.yaml` (none without one); a TemplateError naming the
    file (`where`) and the key for anything wrong in it."""
    path = folder / FILE
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return NONE
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read: {exc}", where) from None
    except yaml.YAMLError as exc:
        mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TemplateError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where + line) from None
    if loaded is None:
        return NONE
    if not isinstance(loaded, dict):
        raise TemplateError(f"expected a mapping of {', '.join(KEYS)}", where)
    unknown = sorted(str(key) for key in loaded.keys() - set(KEYS))
    if unknown:
        raise TemplateError(f"{unknown[0]}: unknown key (known: {', '.join(KEYS)})", where)
    try:
        return _build(loaded)
    except InvalidRequest as exc:
        raise TemplateError(str(exc), where) from None


def _build(raw: dict[str, Any]) -> TemplateDefaults:
    sender = raw.get("from")
    locale = raw.get("locale")
    if locale is not None and not (isinstance(locale, str) and LOCALE.match(locale)):
        raise InvalidRequest(f"locale: {locale!r} is not a locale such as de or de-AT")
    return TemplateDefaults(
        sender=None if sender is None else parse_address(sender, "from"),
        reply_to=_addresses(parse_address)(raw.get("reply_to"), "reply_to"),
        headers=_headers(raw.get("headers"), "headers"),
        tags=check_tags(raw.get("tags"), "tags"),
        locale=locale,
        unsubscribe_url=check_unsubscribe_url(raw.get("unsubscribe_url"), "unsubscribe_url"),
    )
