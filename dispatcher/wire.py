"""Wire protocol v1: one ZeroMQ frame holding one UTF-8 JSON object per request.

The daemon runs `validate()` on every frame: all the rules, addresses through email-validator.
The client runs `encode_checked()`: the same rules, but addresses only by their shape, so a bad
call still raises at once in the caller's stack and a typical request costs ~2 µs instead of
~12 µs. What only the daemon checks is recorded there as rejected. See docs/protocol.md.
"""

import base64
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from dispatcher.address import Address, check_address, check_header_text, parse_address
from dispatcher.errors import InvalidRequest, RequestTooLarge

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
PRIORITIES = {"high": 0, "normal": 1, "low": 2}
TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
LOCALE = re.compile(r"^[A-Za-z]{2,8}([_-][A-Za-z0-9]{1,8})*$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
# Headers the dispatcher writes itself; a request may not set or duplicate them.
RESERVED_HEADERS = frozenset(
    "from to cc bcc reply-to sender subject date message-id mime-version content-type"
    " content-transfer-encoding return-path received".split()
)
FIELDS = frozenset(
    "v id client template to context cc bcc reply_to sender headers attachments send_at"
    " priority idempotency_key locale".split()
)
ADDRESS_LIST_FIELDS = ("to", "cc", "bcc", "reply_to")


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file sent with the message; on the wire its content is base64 in `data`."""

    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request, as the daemon stores and renders it."""

    id: str
    template: str
    to: tuple[Address, ...]
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

    @property
    def recipients(self) -> list[str]:
        """The SMTP envelope: every To, Cc and Bcc address, each once."""
        seen = dict.fromkeys(a.addr_spec for a in (*self.to, *self.cc, *self.bcc))
        return list(seen)


def new_id() -> str:
    """A fresh request id: random, so clients never need to coordinate."""
    return uuid.uuid4().hex


def _default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode(fields: Mapping[str, Any]) -> bytes:
    """Encode a request's fields into one frame; datetime, date, Decimal and UUID become strings."""
    frame = _json(fields)
    _check_frame_size(frame)
    return frame


def _json(fields: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(fields, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise InvalidRequest(f"context: cannot be encoded as JSON: {exc}") from None


def _check_frame_size(frame: bytes) -> None:
    if len(frame) > MAX_FRAME_BYTES:
        raise RequestTooLarge(
            f"request is {len(frame)} bytes, over the limit of {MAX_FRAME_BYTES} bytes"
        )


def encode_checked(fields: dict[str, Any]) -> bytes:
    """The client's check and encoding of a request it built, with its `id` and `client`.

    Every rule of `validate()` except email-validator's part of the address check (see
    `check_address`). The context's size is bounded by the frame's, so it is measured on its
    own only when the frame is near the limit. The common request (one recipient, a context)
    takes the short way.
    """
    _check_request(fields)
    frame = _json(fields)
    if len(frame) > MAX_CONTEXT_BYTES:  # rare: only then can the context be over its limit
        _check_context_size(fields)
        _check_frame_size(frame)
    return frame


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


def check(fields: dict[str, Any], size: int) -> None:
    """The daemon's intake check of a parsed frame of `size` bytes, in a few µs.

    Every rule of `validate()` but email-validator's part of the address check (see
    `check_address`), which costs the most and runs when the request is rendered: an address
    only email-validator refuses makes the request dead there, with the reason.
    """
    if not FIELDS.issuperset(fields):
        raise InvalidRequest(f"unknown field {sorted(set(fields) - FIELDS)[0]!r}")
    if fields.get("v") != VERSION:
        raise InvalidRequest(f"v: unsupported protocol version {fields.get('v')!r}, expected 1")
    _optional_str(fields, "id", REQUEST_ID)
    _optional_str(fields, "client", REQUEST_ID)
    _check_request(fields)
    if size > MAX_CONTEXT_BYTES:
        _check_context_size(fields)


def _check_request(fields: dict[str, Any]) -> None:
    """What the client and the daemon's intake check alike; the common request (one
    recipient, a context) takes the short way."""
    template = fields.get("template")
    if not (isinstance(template, str) and TEMPLATE_NAME.match(template)):
        _template(template)  # raises, saying why
    to = fields.get("to")
    if isinstance(to, str) and "cc" not in fields and "bcc" not in fields:
        check_address(to, "to[0]")  # one recipient: nothing to count
    else:
        _check_recipients(fields)
    context = fields.get("context")
    if context is not None and not isinstance(context, dict):
        raise InvalidRequest(f"context: expected an object, got {type(context).__name__}")
    if not _COMMON_FIELDS.issuperset(fields):
        _check_options(fields)


def _check_context_size(fields: dict[str, Any]) -> None:
    if fields.get("context") is not None:
        _context(fields["context"])


_COMMON_FIELDS = frozenset(("v", "id", "client", "template", "to", "context"))


def _check_recipients(fields: dict[str, Any]) -> None:
    _check_recipient_count(fields)
    if not fields.get("to"):
        raise InvalidRequest("to: at least one recipient is required")
    for name in ("to", "cc", "bcc"):
        value = fields.get(name)
        if value is not None:
            _check_addresses(value, name)


def _check_options(fields: dict[str, Any]) -> None:
    """The rarely given fields, each checked as `validate()` does."""
    if fields.get("reply_to") is not None:
        _check_addresses(fields["reply_to"], "reply_to")
    if fields.get("sender") is not None:
        check_address(fields["sender"], "sender")
    _headers(fields.get("headers"))
    _attachments(fields.get("attachments"))
    _send_at(fields.get("send_at"))
    _priority(fields.get("priority", "normal"))
    _optional_str(fields, "idempotency_key")
    _optional_str(fields, "locale", LOCALE)


def decode(frame: bytes) -> Request:
    """Parse and validate one frame from the socket; every failure is an `InvalidRequest`."""
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


def validate(fields: object) -> Request:
    """Check every field of a decoded request and build the `Request` the daemon works with."""
    if not isinstance(fields, dict):
        raise InvalidRequest(f"expected a JSON object, got {type(fields).__name__}")
    if not FIELDS.issuperset(fields):
        raise InvalidRequest(f"unknown field {sorted(set(fields) - FIELDS)[0]!r}")
    if fields.get("v") != VERSION:
        raise InvalidRequest(f"v: unsupported protocol version {fields.get('v')!r}, expected 1")
    _check_recipient_count(fields)
    lists = {name: _addresses(fields.get(name), name) for name in ADDRESS_LIST_FIELDS}
    if not lists["to"]:
        raise InvalidRequest("to: at least one recipient is required")
    return Request(
        id=_optional_str(fields, "id", REQUEST_ID) or new_id(),
        template=_template(fields.get("template")),
        context=_context(fields.get("context")),
        sender=None if fields.get("sender") is None else parse_address(fields["sender"], "sender"),
        headers=_headers(fields.get("headers")),
        attachments=_attachments(fields.get("attachments")),
        send_at=_send_at(fields.get("send_at")),
        priority=_priority(fields.get("priority", "normal")),
        idempotency_key=_optional_str(fields, "idempotency_key"),
        locale=_optional_str(fields, "locale", LOCALE),
        client=_optional_str(fields, "client", REQUEST_ID),
        **lists,
    )


def to_fields(request: Request) -> dict[str, Any]:
    """The wire form of a validated request: what the spool stores and `decode` reads back."""
    fields: dict[str, Any] = {"v": VERSION, "id": request.id, "template": request.template}
    for name in ADDRESS_LIST_FIELDS:
        addresses = getattr(request, name)
        if addresses or name == "to":
            fields[name] = [str(a) for a in addresses]
    fields["context"] = request.context
    optional = {
        "sender": str(request.sender) if request.sender else None,
        "headers": request.headers or None,
        "attachments": [attachment_fields(a) for a in request.attachments] or None,
        "send_at": request.send_at.isoformat() if request.send_at else None,
        "priority": request.priority if request.priority != "normal" else None,
        "idempotency_key": request.idempotency_key,
        "locale": request.locale,
        "client": request.client,
    }
    fields.update((k, v) for k, v in optional.items() if v is not None)
    return fields


def attachment_fields(attachment: Attachment) -> dict[str, str]:
    """An attachment in wire form."""
    return {
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "data": base64.b64encode(attachment.content).decode("ascii"),
    }


def _template(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("template: a template name (string) is required")
    if not TEMPLATE_NAME.match(value):
        raise InvalidRequest(
            f"template: {value!r} is not a template name (letters, digits, '_' and '-' only)"
        )
    return value


def _check_recipient_count(fields: dict[str, Any]) -> None:
    """Count before parsing: a frame of 100,000 addresses must not cost 100,000 validations."""
    counted = [fields.get(name) for name in ("to", "cc", "bcc")]
    total = sum(len(v) if isinstance(v, list) else 1 for v in counted if v is not None)
    if total > MAX_RECIPIENTS:
        raise InvalidRequest(
            f"to, cc, bcc: {total} recipients; at most {MAX_RECIPIENTS} recipients per request"
        )


def _addresses(value: object, name: str) -> tuple[Address, ...]:
    if value is None:
        return ()
    items: Iterable[object] = [value] if isinstance(value, str) else value  # type: ignore[assignment]
    if not isinstance(items, list):
        raise InvalidRequest(f"{name}: expected an address or a list of addresses")
    return tuple(parse_address(item, f"{name}[{i}]") for i, item in enumerate(items))


def _check_addresses(value: object, name: str) -> None:
    if isinstance(value, str):
        check_address(value, f"{name}[0]")
        return
    if not isinstance(value, list):
        raise InvalidRequest(f"{name}: expected an address or a list of addresses")
    for i, item in enumerate(value):
        check_address(item, f"{name}[{i}]")


def _context(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"context: expected an object, got {type(value).__name__}")
    try:
        size = len(orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS))
    except TypeError as exc:  # also orjson's nesting limit
        raise InvalidRequest(f"context: cannot be encoded as JSON: {exc}") from None
    if size > MAX_CONTEXT_BYTES:
        raise RequestTooLarge(
            f"context: {size} bytes as JSON, at most {MAX_CONTEXT_BYTES} bytes are allowed"
        )
    return value


def _headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("headers: expected an object of header names to values")
    if len(value) > MAX_HEADERS:
        raise InvalidRequest(f"headers: {len(value)} headers, at most {MAX_HEADERS} are allowed")
    for name, text in value.items():
        if not HEADER_NAME.match(name):
            raise InvalidRequest(f"headers: {name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise InvalidRequest(f"headers: {name} is set by the dispatcher, not by requests")
        if not isinstance(text, str):
            raise InvalidRequest(f"headers.{name}: expected a string")
        check_header_text(text, f"headers.{name}")
        if len(text) > MAX_HEADER_CHARS:
            raise InvalidRequest(
                f"headers.{name}: at most {MAX_HEADER_CHARS} characters are allowed"
            )
    return value


def _attachments(value: object) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("attachments: expected a list")
    if len(value) > MAX_ATTACHMENTS:
        raise InvalidRequest(
            f"attachments: {len(value)} files, at most {MAX_ATTACHMENTS} are allowed"
        )
    result = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict) or not {"filename", "data"} <= set(item):
            raise InvalidRequest(f"{where}: expected an object with 'filename' and 'data'")
        filename, content_type = (
            item["filename"],
            item.get("content_type", "application/octet-stream"),
        )
        if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename:
            raise InvalidRequest(f"{where}.filename: expected a plain file name")
        check_header_text(filename, f"{where}.filename")
        if not isinstance(content_type, str) or not re.match(r"^[\w.+-]+/[\w.+-]+$", content_type):
            raise InvalidRequest(f"{where}.content_type: expected a MIME type such as text/csv")
        try:
            content = base64.b64decode(item["data"], validate=True)
        except (ValueError, TypeError):
            raise InvalidRequest(f"{where}.data: expected base64") from None
        if len(content) > MAX_ATTACHMENT_BYTES:
            raise InvalidRequest(
                f"{where}: {len(content)} bytes, at most {MAX_ATTACHMENT_BYTES} bytes per file"
            )
        result.append(Attachment(filename, content_type, content))
    return tuple(result)


def _send_at(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment
    raise InvalidRequest(f"send_at: expected an ISO 8601 time with a UTC offset, got {value!r}")


def _priority(value: object) -> str:
    if value not in PRIORITIES:
        raise InvalidRequest(f"priority: {value!r} is not one of high, normal, low")
    return str(value)


def _optional_str(
    fields: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None
) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or (pattern and not pattern.match(value)) or len(value) > 200:
        raise InvalidRequest(f"{name}: {value!r} is not valid")
    return value
