"""Wire protocol v1: one ZeroMQ frame holding one UTF-8 JSON object per request.

Every field has one rule in `RULES`, applied at two strengths. `check()` is the shape check,
cheap enough for every call: the client runs it before sending and the daemon's intake on every
frame, with addresses checked by their shape. `validate()` is the full check the render worker
runs: addresses through email-validator, and it builds the `Request`. A request that passes the
shape check and fails the full one becomes dead, with the reason. See docs/protocol.md.
"""

import base64
import mimetypes
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Required, TypedDict, TypeVar

import orjson

from dispatcher.address import (
    PLAIN_ADDRESS,
    Address,
    check_address,
    check_header_text,
    parse_address,
)
from dispatcher.errors import InvalidRequest, RequestTooLarge

if TYPE_CHECKING:
    from dispatcher.raw import RawMessage

VERSION = 1
# The daemon's socket refuses frames above twice this (ZMQ_MAXMSGSIZE), so a frame between the
# two limits still reaches the daemon and is recorded as rejected with its size.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# Limits a request must keep, checked by the client and again by the daemon. They bound what one
# frame can make the daemon do (parse, store, render, send) and how far one call can spread mail.
MAX_RECIPIENTS = 50  # to + cc + bcc together
MAX_ATTACHMENTS = 10
MAX_ATTACHMENT_BYTES = 2 * 1024 * 1024  # decoded, each; the frame limit bounds the total
MAX_CONTEXT_BYTES = 64 * 1024  # the context as JSON
MAX_HEADERS = 20  # extra headers of one request
MAX_HEADER_CHARS = 900  # one extra header's value
MAX_TEXT_CHARS = 200  # an id, idempotency key or locale
MAX_BODY_CHARS = 1024 * 1024  # `text` or `html` of a request without a template, each
MAX_TAGS = 10  # tags of one request
MAX_METADATA_BYTES = 2048  # a request's metadata as JSON
MAX_URL_CHARS = 900  # an unsubscribe URL (it becomes a header line)
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
# Anchored with \Z, not $: `$` also matches before a final newline ("welcome\n").
TEMPLATE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
REQUEST_ID = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
LOCALE = re.compile(r"\A[A-Za-z]{2,8}([_-][A-Za-z0-9]{1,8})*\Z")
HEADER_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9-]{0,75}\Z")
MIME_TYPE = re.compile(r"\A[\w.+-]+/[\w.+-]+\Z")
# Patterns of optional fields, compiled on first use (re's cache), not at import: the client
# imports this module at an app's boot.
TAG = r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z"
TIMEZONE = r"\A[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*\Z"
# A Content-ID as `cid:` URLs name it (RFC 2392), kept to plain characters.
CONTENT_ID = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(@[A-Za-z0-9.-]{1,64})?\Z"
# Headers the dispatcher writes itself; a request may not set or duplicate them.
RESERVED_HEADERS = frozenset(
    "from to cc bcc reply-to sender subject date message-id mime-version content-type"
    " content-transfer-encoding return-path received dkim-signature".split()
)
ADDRESS_LIST_FIELDS = ("to", "cc", "bcc", "reply_to")


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file sent with the message; on the wire its content is base64 in `data`."""

    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None  # inline: the HTML shows it as `cid:<content_id>`


AttachmentInput = Attachment | tuple[str, bytes] | tuple[str, bytes, str]


@dataclass(frozen=True, slots=True)
class Request:
    """A request that passed the full check, as the daemon stores and renders it."""

    id: str
    template: str | None  # None: a request of another kind (see `kind`)
    to: tuple[Address, ...]  # a raw request: every envelope recipient
    context: dict[str, Any]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    sender: Address | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()
    send_at: datetime | None = None
    priority: str = "normal"
    idempotency_key: str | None = None
    locale: str | None = None
    client: str | None = None
    subject: str | None = None  # kind "message": the parts themselves, no template
    text: str | None = None
    html: str | None = None
    raw: "RawMessage | None" = None  # kind "raw": a message built by the app
    envelope_from: Address | None = None
    timezone: str | None = None  # IANA name; dates in the template are shown in it
    unsubscribe_url: str | None = None  # https; sent as RFC 8058 one-click List-Unsubscribe
    tags: tuple[str, ...] = ()  # for `status --tag`; never metric labels
    metadata: dict[str, Any] = field(default_factory=dict)  # the sender's own, kept as given

    @property
    def kind(self) -> str:
        """How the daemon makes the message: from a "template", a "message" (the parts
        themselves) or "raw" (a message the app built)."""
        return "template" if self.template else "raw" if self.raw else "message"

    @property
    def recipients(self) -> list[str]:
        """The SMTP envelope: every To, Cc and Bcc address, each once."""
        seen = dict.fromkeys(a.addr_spec for a in (*self.to, *self.cc, *self.bcc))
        return list(seen)


class EmailOptions(TypedDict, total=False):
    """A request as `enqueue_email()` takes it after the template name: Python values."""

    to: Required[str | Sequence[str]]  # an address ("Name <addr>" too), or a list of them
    context: Mapping[str, Any] | None  # JSON, plus datetime, date, Decimal and UUID
    cc: str | Sequence[str] | None
    bcc: str | Sequence[str] | None
    reply_to: str | Sequence[str] | None
    sender: str | None
    headers: Mapping[str, str] | None
    attachments: Iterable[AttachmentInput] | None  # guessed from the file name without a type
    send_at: datetime | None  # timezone-aware
    priority: str  # "high", "normal" or "low"
    idempotency_key: str | None
    locale: str | None
    timezone: str | None  # an IANA time zone name such as "Europe/Vienna"
    unsubscribe_url: str | None  # https URL for List-Unsubscribe (RFC 8058 one-click)
    tags: Sequence[str] | None  # at most MAX_TAGS short names; `dispatcher status --tag`
    metadata: Mapping[str, Any] | None  # at most MAX_METADATA_BYTES as JSON; stored, not sent


class MessageOptions(EmailOptions, total=False):
    """`enqueue_message()`'s arguments: the parts themselves instead of a template's name.

    A `context` is refused (there is no template to give it to).
    """

    subject: Required[str]
    text: str | None  # derived from `html` when absent
    html: str | None


class RawOptions(TypedDict, total=False):
    """`enqueue_raw()`'s options: when and how to send a message the app built (`raw`)."""

    raw: Any  # an `email.message.Message` or bytes; `enqueue_raw()`'s first argument
    envelope_from: str | None  # default: Sender, else From (as smtplib's send_message)
    recipients: str | Sequence[str] | None  # default: To, Cc and Bcc of the message
    send_at: datetime | None
    priority: str
    idempotency_key: str | None


# -- the rules ---------------------------------------------------------------------------------

T = TypeVar("T")
# A rule's check: it gets a field's value (None when absent) and name, raises `InvalidRequest`
# saying why, and returns the value a `Request` holds (the shape check ignores it).
Check = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class Rule:
    """One field of a request: how to check its shape, and how to validate it fully.

    The full check refuses whatever the shape check refuses; the two differ only where the
    full one costs more (addresses, the context's size) or converts the value.
    """

    name: str
    shape: Check
    full: Check
    # A string of at most MAX_TEXT_CHARS that this matches passes the shape check without a
    # call: the common id, client, template and address cost a lookup and a match. It must
    # accept nothing `shape` refuses (a property test holds it to that).
    plain: re.Pattern[str] | None = None


def new_id() -> str:
    """A fresh request id: random, so clients never need to coordinate."""
    return uuid.uuid4().hex


def _version(value: object, name: str) -> int:
    if value != VERSION:
        raise InvalidRequest(f"{name}: unsupported protocol version {value!r}, expected 1")
    return VERSION


def _text(pattern: re.Pattern[str] | None = None) -> Check:
    """The rule of an optional string of at most MAX_TEXT_CHARS, matching `pattern` if given."""

    def rule(value: object, name: str) -> str | None:
        if value is None:
            return None
        if (
            not isinstance(value, str)
            or len(value) > MAX_TEXT_CHARS
            or not (pattern is None or pattern.match(value))
        ):
            raise InvalidRequest(f"{name}: {value!r} is not valid")
        return value

    return rule


def _or_new_id(rule: Check) -> Check:
    """`rule`, and a new id when the value is absent."""

    def with_default(value: object, name: str) -> str:
        return rule(value, name) or new_id()

    return with_default


def _template(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name}: a template name (string) is required")
    if not TEMPLATE_NAME.match(value):
        raise InvalidRequest(
            f"{name}: {value!r} is not a template name (letters, digits, '_' and '-' only)"
        )
    return value


def _addresses(one: Callable[[object, str], T], *, required: bool = False) -> Check:
    """The rule of an address or list of addresses, each checked by `one`: `check_address`
    (the shape) or `parse_address` (the full check)."""

    def rule(value: object, name: str) -> tuple[T, ...]:
        if value.__class__ is str:  # the common case: one address
            return (one(value, f"{name}[0]"),)
        if value is None or value == []:
            if required:
                raise InvalidRequest(f"{name}: at least one recipient is required")
            return ()
        if not isinstance(value, list):
            raise InvalidRequest(f"{name}: expected an address or a list of addresses")
        return tuple(one(item, f"{name}[{i}]") for i, item in enumerate(value))

    return rule


def _address(one: Callable[[object, str], T]) -> Check:
    """The rule of an optional single address, checked by `one`."""

    def rule(value: object, name: str) -> T | None:
        return None if value is None else one(value, name)

    return rule


def _object(value: object, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name}: expected an object, got {type(value).__name__}")
    return value


def _context(value: object, name: str) -> dict[str, Any]:
    """An object of at most MAX_CONTEXT_BYTES as JSON: measured by encoding it."""
    context = _object(value, name)
    size = len(_json(context))
    if size > MAX_CONTEXT_BYTES:
        raise RequestTooLarge(
            f"{name}: {size} bytes as JSON, at most {MAX_CONTEXT_BYTES} bytes are allowed"
        )
    return context


def _headers(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name}: expected an object of header names to values")
    if len(value) > MAX_HEADERS:
        raise InvalidRequest(f"{name}: {len(value)} headers, at most {MAX_HEADERS} are allowed")
    for header, text in value.items():
        if not HEADER_NAME.match(header):
            raise InvalidRequest(f"{name}: {header!r} is not a valid header name")
        if header.lower() in RESERVED_HEADERS:
            raise InvalidRequest(f"{name}: {header} is set by the dispatcher, not by requests")
        if not isinstance(text, str):
            raise InvalidRequest(f"{name}.{header}: expected a string")
        check_header_text(text, f"{name}.{header}")
        if len(text) > MAX_HEADER_CHARS:
            raise InvalidRequest(
                f"{name}.{header}: at most {MAX_HEADER_CHARS} characters are allowed"
            )
    return value


def _attachments(value: object, name: str) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"{name}: expected a list")
    if len(value) > MAX_ATTACHMENTS:
        raise InvalidRequest(f"{name}: {len(value)} files, at most {MAX_ATTACHMENTS} are allowed")
    return tuple(_attachment(item, f"{name}[{i}]") for i, item in enumerate(value))


def _attachment(item: object, where: str) -> Attachment:
    if not isinstance(item, dict) or not {"filename", "data"} <= item.keys():
        raise InvalidRequest(f"{where}: expected an object with 'filename' and 'data'")
    filename = item["filename"]
    content_type = item.get("content_type", "application/octet-stream")
    if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename:
        raise InvalidRequest(f"{where}.filename: expected a plain file name")
    check_header_text(filename, f"{where}.filename")
    if not isinstance(content_type, str) or not MIME_TYPE.match(content_type):
        raise InvalidRequest(f"{where}.content_type: expected a MIME type such as text/csv")
    content_id = item.get("content_id")
    plain_id = isinstance(content_id, str) and re.match(CONTENT_ID, content_id)
    if not (content_id is None or plain_id):
        raise InvalidRequest(
            f"{where}.content_id: expected a name such as 'logo' (letters, digits, '.', '_', '-')"
        )
    try:
        content = base64.b64decode(item["data"], validate=True)
    except (ValueError, TypeError):
        raise InvalidRequest(f"{where}.data: expected base64") from None
    if len(content) > MAX_ATTACHMENT_BYTES:
        raise InvalidRequest(
            f"{where}: {len(content)} bytes, at most {MAX_ATTACHMENT_BYTES} bytes per file"
        )
    return Attachment(filename, content_type, content, content_id)


def _subject(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{name}: a subject (non-empty string) is required")
    check_header_text(value, name)
    if len(value) > MAX_HEADER_CHARS:
        raise InvalidRequest(f"{name}: at most {MAX_HEADER_CHARS} characters are allowed")
    return value


def _body(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name}: expected a string")
    if len(value) > MAX_BODY_CHARS:
        raise RequestTooLarge(f"{name}: at most {MAX_BODY_CHARS} characters are allowed")
    return value


def _raw(full: bool) -> Check:
    def rule(value: object, name: str) -> "RawMessage":
        from dispatcher.raw import decode_raw

        return decode_raw(value, name, full=full)

    return rule


def _send_at(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment
    raise InvalidRequest(f"{name}: expected an ISO 8601 time with a UTC offset, got {value!r}")


def _priority(value: object, name: str) -> str:
    if value is None:
        return "normal"
    if value not in PRIORITIES:
        raise InvalidRequest(f"{name}: {value!r} is not one of high, normal, low")
    return str(value)


def _timezone(value: object, name: str) -> str | None:
    """An IANA zone name that this machine's zoneinfo knows (imported here: only a request
    naming a zone pays for it)."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 64 and re.match(TIMEZONE, value):
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
            return value
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    raise InvalidRequest(f"{name}: {value!r} is not an IANA time zone such as Europe/Vienna")


def check_unsubscribe_url(value: object, name: str) -> str | None:
    """An https URL that can stand in `List-Unsubscribe: <url>` as it is: printable ASCII,
    no space, no CR or LF, no angle brackets."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("https://"):
        raise InvalidRequest(f"{name}: expected an https:// URL (RFC 8058 one-click)")
    if len(value) > MAX_URL_CHARS or not value.isascii() or not value.isprintable():
        raise InvalidRequest(f"{name}: printable ASCII of at most {MAX_URL_CHARS} characters")
    if any(char in value for char in ' <>"') or len(value) == len("https://"):
        raise InvalidRequest(f"{name}: {value!r} is not a valid URL (space, '<', '>' or '\"')")
    return value


def check_tags(value: object, name: str) -> tuple[str, ...]:
    """At most MAX_TAGS names of letters, digits and `_ . : -`, each once."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"{name}: expected a list of tag names")
    if len(value) > MAX_TAGS:
        raise InvalidRequest(f"{name}: {len(value)} tags, at most {MAX_TAGS} are allowed")
    for index, tag in enumerate(value):
        if not isinstance(tag, str) or not re.match(TAG, tag):
            raise InvalidRequest(
                f"{name}[{index}]: {tag!r} is not a tag (up to 64 letters, digits, '_.:-')"
            )
    return tuple(dict.fromkeys(value))


def _metadata(value: object, name: str) -> dict[str, Any]:
    metadata = _object(value, name)
    size = len(_json(metadata)) if metadata else 0
    if size > MAX_METADATA_BYTES:
        raise RequestTooLarge(
            f"{name}: {size} bytes as JSON, at most {MAX_METADATA_BYTES} bytes are allowed"
        )
    return metadata


RULES = (
    Rule("v", _version, _version),
    Rule("id", _text(REQUEST_ID), _or_new_id(_text(REQUEST_ID)), REQUEST_ID),
    Rule("client", _text(REQUEST_ID), _text(REQUEST_ID), REQUEST_ID),
    Rule("template", _template, _template, TEMPLATE_NAME),
    Rule(
        "to",
        _addresses(check_address, required=True),
        _addresses(parse_address, required=True),
        PLAIN_ADDRESS,
    ),
    Rule("cc", _addresses(check_address), _addresses(parse_address), PLAIN_ADDRESS),
    Rule("bcc", _addresses(check_address), _addresses(parse_address), PLAIN_ADDRESS),
    Rule("reply_to", _addresses(check_address), _addresses(parse_address), PLAIN_ADDRESS),
    Rule("sender", _address(check_address), _address(parse_address), PLAIN_ADDRESS),
    Rule("context", _object, _context),  # the shape check measures it only in a large frame
    Rule("headers", _headers, _headers),
    Rule("attachments", _attachments, _attachments),
    Rule("send_at", _send_at, _send_at),
    Rule("priority", _priority, _priority),
    Rule("idempotency_key", _text(), _text()),
    Rule("locale", _text(LOCALE), _text(LOCALE), LOCALE),
    Rule("subject", _subject, _subject),
    Rule("text", _body, _body),
    Rule("html", _body, _body),
    Rule("raw", _raw(full=False), _raw(full=True)),
    Rule("envelope_from", _address(check_address), _address(parse_address), PLAIN_ADDRESS),
    Rule("recipients", _addresses(check_address), _addresses(parse_address), PLAIN_ADDRESS),
    Rule("timezone", _timezone, _timezone),
    Rule("unsubscribe_url", check_unsubscribe_url, check_unsubscribe_url),
    Rule("tags", check_tags, check_tags),
    Rule("metadata", _metadata, _metadata),
)
REQUIRED = ("v", "template", "to")
Shape = tuple[re.Pattern[str] | None, Check | None]  # a rule's `plain` and `shape`
_SHAPES: dict[str, Shape] = {rule.name: (rule.plain, rule.shape) for rule in RULES}


def _unknown(value: object, name: str) -> None:
    raise InvalidRequest(f"unknown field {name!r}")


def _not_of(kind: str) -> Check:
    """The rule of a field that a request of `kind` does not take."""
    what = {"template": "a template", "message": "a message without a template", "raw": "raw"}

    def rule(value: object, name: str) -> None:
        if value is not None:
            raise InvalidRequest(f"{name}: not allowed in a request with {what[kind]}")

    return rule


_UNKNOWN: Shape = (None, _unknown)


def _check_recipient_count(fields: dict[str, Any]) -> None:
    """Count before checking: a frame of 100,000 addresses must not cost 100,000 checks."""
    counted = [fields.get(name) for name in ("to", "cc", "bcc", "recipients")]
    total = sum(len(v) if isinstance(v, list) else 1 for v in counted if v is not None)
    if total > MAX_RECIPIENTS:
        raise InvalidRequest(
            f"to, cc, bcc: {total} recipients; at most {MAX_RECIPIENTS} recipients per request"
        )


# -- request kinds: a template's name, the parts themselves, or a message the app built ------

_MESSAGE_FIELDS = frozenset(("subject", "text", "html"))
_RAW_FIELDS = frozenset(("raw", "envelope_from", "recipients"))
_ENVELOPE_FIELDS = frozenset(("v", "id", "client", "send_at", "priority", "idempotency_key"))
_BOOKKEEPING_FIELDS = frozenset(("tags", "metadata"))  # the sender's, for `status --tag`
# The fields each kind takes; a field of another kind is refused, naming the kind.
KIND_FIELDS = {
    "template": frozenset(_SHAPES) - _MESSAGE_FIELDS - _RAW_FIELDS,
    "message": frozenset(_SHAPES) - {"template", "context"} - _RAW_FIELDS,
    "raw": _RAW_FIELDS | _ENVELOPE_FIELDS | _BOOKKEEPING_FIELDS,
}
_RULES = {
    kind: [rule for rule in RULES if rule.name in names] for kind, names in KIND_FIELDS.items()
}
KIND_REQUIRED = {"template": REQUIRED, "message": ("v", "to", "subject"), "raw": ("v", "raw")}
_KIND_SHAPES = {
    kind: {name: _SHAPES[name] if name in names else (None, _not_of(kind)) for name in _SHAPES}
    for kind, names in KIND_FIELDS.items()
}


_TEMPLATE_SHAPES = _KIND_SHAPES["template"]
# What the client checks of what its caller gave: not the envelope, which it writes itself.
_CALLER_SHAPES = _TEMPLATE_SHAPES | dict.fromkeys(("v", "id", "client"), (None, None))


def kind_of(fields: Mapping[str, Any]) -> str:
    """A request's kind, by the fields it has: "template" unless it names none and has the
    parts ("message") or a built message ("raw")."""
    if "template" in fields:
        return "template"
    if "raw" in fields:
        return "raw"
    return "message" if not _MESSAGE_FIELDS.isdisjoint(fields) else "template"


def label(fields: Mapping[str, Any]) -> str:
    """What the spool's template column and the logs show: the template, or `(kind)`."""
    template = fields.get("template")
    return template if isinstance(template, str) else f"({kind_of(fields)})"


def _check_kind(fields: dict[str, Any], kind: str, envelope: bool) -> None:
    """The shape check of a request without a template: its kind's fields, and its parts."""
    shapes = _KIND_SHAPES[kind]
    for name in KIND_REQUIRED[kind]:
        if name not in fields and (envelope or name != "v"):
            _SHAPES[name][1](None, name)  # type: ignore[misc]  # raises, saying why
    for name, value in fields.items():
        if not envelope and name in ("v", "id", "client"):
            continue
        shape = shapes.get(name, _UNKNOWN)[1]
        if shape is not None:
            shape(value, name)
    _check_parts(fields, kind)


def _check_parts(fields: dict[str, Any], kind: str) -> None:
    if kind == "message" and fields.get("text") is None and fields.get("html") is None:
        raise InvalidRequest("text, html: a message without a template needs text or html")


# -- the two strengths -------------------------------------------------------------------------


def check(fields: dict[str, Any], size: int, *, envelope: bool = True) -> None:
    """The shape check of a request's fields, parsed from a frame of `size` bytes.

    What the daemon's intake runs on every frame, and the client (`encode()`) on what its
    caller gave: `envelope=False` leaves out `v`, `id` and `client`, which the client writes
    itself. The context is measured only when the frame is large enough to hold one over its
    limit.
    """
    if "template" not in fields and (kind := kind_of(fields)) != "template":
        _check_recipient_count(fields)
        return _check_kind(fields, kind, envelope)
    shapes = _TEMPLATE_SHAPES if envelope else _CALLER_SHAPES
    if "cc" in fields or "bcc" in fields or fields.get("to").__class__ is not str:
        _check_recipient_count(fields)
    if "v" not in fields or "template" not in fields or "to" not in fields:
        for name in REQUIRED:
            if (shape := shapes[name][1]) is not None:
                shape(fields.get(name), name)  # raises for an absent one, saying why
    for name, value in fields.items():
        plain, shape = shapes.get(name, _UNKNOWN)
        if (
            plain is not None
            and value.__class__ is str
            and len(value) <= MAX_TEXT_CHARS
            and plain.match(value)
        ):
            continue
        if shape is not None:
            shape(value, name)
    if size > MAX_CONTEXT_BYTES:
        _context(fields.get("context"), "context")


def validate(fields: object) -> Request:
    """The full check of a decoded request, which builds the `Request` the daemon renders."""
    if not isinstance(fields, dict):
        raise InvalidRequest(f"expected a JSON object, got {type(fields).__name__}")
    unknown = fields.keys() - _SHAPES.keys()
    if unknown:
        raise InvalidRequest(f"unknown field {min(unknown, key=str)!r}")
    _check_recipient_count(fields)
    kind = kind_of(fields)
    names = KIND_FIELDS[kind]
    for name in fields.keys() - names:
        _not_of(kind)(fields[name], name)
    _check_parts(fields, kind)
    values = {rule.name: rule.full(fields.get(rule.name), rule.name) for rule in _RULES[kind]}
    del values["v"]  # checked; not part of a Request
    if values.get("unsubscribe_url") and any(
        header.lower().startswith("list-unsubscribe") for header in values["headers"]
    ):
        raise InvalidRequest("headers: List-Unsubscribe is written from unsubscribe_url; set one")
    if kind == "raw":
        message: RawMessage = values.pop("raw")
        recipients = values.pop("recipients") or message.recipients
        if not recipients:
            raise InvalidRequest("recipients: none given, and no To, Cc or Bcc in the message")
        return Request(template=None, to=recipients, context={}, raw=message, **values)
    values.setdefault("template", None)
    values.setdefault("context", {})
    return Request(**values)


# -- frames ------------------------------------------------------------------------------------


def request_fields(
    template: str | None,
    options: EmailOptions | MessageOptions | RawOptions,
    *,
    id: str | None = None,
    client: str | None = None,
) -> dict[str, Any]:
    """A request's wire fields from `enqueue_email()`'s arguments (or, without a template,
    `enqueue_message()`'s or `enqueue_raw()`'s), not yet checked.

    Files and a raw message become base64, times ISO 8601, mappings and tuples JSON objects
    and lists; an option given as None is absent. Without an `id` it gets a new one; without
    a `client` the daemon sends no receipt.
    """
    fields: dict[str, Any] = {"v": VERSION, "id": id or new_id(), **options}
    if template is not None:
        fields["template"] = template
    if client is not None:
        fields["client"] = client
    for name, value in options.items():
        if value is None:
            del fields[name]
        elif name in _CONVERT or value.__class__ not in _JSON_TYPES:
            fields[name] = _CONVERT.get(name, _plain)(value)
    return fields


_JSON_TYPES = frozenset((str, list, dict, int, float, bool))


def _plain(value: Any) -> Any:
    """What orjson encodes as JSON: a mapping as a dict, a tuple of addresses as a list."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _attachment_list(items: Iterable[AttachmentInput]) -> list[dict[str, str]]:
    return [attachment_fields(_as_attachment(item)) for item in items]


def _as_attachment(item: AttachmentInput) -> Attachment:
    if isinstance(item, Attachment):
        return item
    if not isinstance(item, tuple) or len(item) not in (2, 3):
        raise InvalidRequest(
            "attachments: expected (filename, content) or (filename, content, type)"
        )
    filename, content = item[0], item[1]
    if not isinstance(content, bytes):
        raise InvalidRequest(f"attachments: content of {filename!r} must be bytes")
    guessed = mimetypes.guess_type(PurePath(str(filename)).name)[0] or "application/octet-stream"
    return Attachment(filename, item[2] if len(item) == 3 else guessed, content)


def _iso_time(moment: object) -> str:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise InvalidRequest("send_at: expected a timezone-aware datetime")
    return moment.isoformat()


def _raw_data(message: Any) -> str:
    from dispatcher.raw import MAX_RAW_BYTES, encode_raw, message_bytes

    message = message_bytes(message)
    if len(message) > MAX_RAW_BYTES:
        raise RequestTooLarge(f"raw: at most {MAX_RAW_BYTES} bytes are allowed")
    return encode_raw(message)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "attachments": _attachment_list,
    "send_at": _iso_time,
    "raw": _raw_data,
}


def attachment_fields(attachment: Attachment) -> dict[str, str]:
    """An attachment in wire form."""
    fields = {
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "data": base64.b64encode(attachment.content).decode("ascii"),
    }
    if attachment.content_id is not None:
        fields["content_id"] = attachment.content_id
    return fields


def encode(fields: dict[str, Any]) -> bytes:
    """The client's shape check and frame of a request's fields, as `request_fields()` builds
    them; datetime, date, Decimal and UUID values in the context become strings.

    The envelope (`v`, `id`, `client`) is the client's own writing, so only what its caller
    gave is checked; the daemon's intake checks every field.
    """
    frame = _json(fields)
    check(fields, len(frame), envelope=False)
    if len(frame) > MAX_FRAME_BYTES:
        raise RequestTooLarge(
            f"request is {len(frame)} bytes, over the limit of {MAX_FRAME_BYTES} bytes"
        )
    return frame


def _default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _json(value: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:  # also orjson's nesting limit
        raise InvalidRequest(f"context: cannot be encoded as JSON: {exc}") from None


def parse(frame: bytes) -> dict[str, Any]:
    """One frame from the socket as a JSON object, before any check of its fields."""
    if len(frame) > MAX_FRAME_BYTES:
        raise RequestTooLarge(f"frame is {len(frame)} bytes, over the limit of {MAX_FRAME_BYTES}")
    try:
        fields = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"not a JSON object: {exc}") from None
    if not isinstance(fields, dict):
        raise InvalidRequest(f"expected a JSON object, got {type(fields).__name__}")
    return fields


def decode(frame: bytes) -> Request:
    """Parse and fully check one frame; every failure is an `InvalidRequest`."""
    return validate(parse(frame))


def sender_of(frame: bytes) -> tuple[str, str] | None:
    """The (client, id) a frame names, if it names both validly, even when the rest of it is
    invalid: the daemon acknowledges a rejection too, so the client stops sending it."""
    try:
        fields = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    client, request_id = fields.get("client"), fields.get("id")
    if not (isinstance(client, str) and isinstance(request_id, str)):
        return None
    if REQUEST_ID.match(client) and REQUEST_ID.match(request_id):
        return client, request_id
    return None


def to_fields(request: Request) -> dict[str, Any]:
    """The wire form of a checked request: what the spool stores and `validate` reads back."""
    fields: dict[str, Any] = {"v": VERSION, "id": request.id}
    if request.template is not None:
        fields.update(template=request.template, context=request.context)
    if request.raw is not None:
        from dispatcher.raw import encode_raw

        fields.update(raw=encode_raw(request.raw.data), recipients=[str(a) for a in request.to])
    else:
        for name in ADDRESS_LIST_FIELDS:
            addresses = getattr(request, name)
            if addresses or name == "to":
                fields[name] = [str(a) for a in addresses]
    optional = {
        "subject": request.subject,
        "text": request.text,
        "html": request.html,
        "envelope_from": str(request.envelope_from) if request.envelope_from else None,
        "sender": str(request.sender) if request.sender else None,
        "headers": request.headers or None,
        "attachments": [attachment_fields(a) for a in request.attachments] or None,
        "send_at": request.send_at.isoformat() if request.send_at else None,
        "priority": request.priority if request.priority != "normal" else None,
        "idempotency_key": request.idempotency_key,
        "locale": request.locale,
        "client": request.client,
        "timezone": request.timezone,
        "unsubscribe_url": request.unsubscribe_url,
        "tags": list(request.tags) or None,
        "metadata": request.metadata or None,
    }
    names = KIND_FIELDS[request.kind]
    fields.update((k, v) for k, v in optional.items() if v is not None and k in names)
    return fields
