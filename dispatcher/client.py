"""The app side: `enqueue_email()` validates, encodes and hands a request over without waiting.

One `Handoff` (sockets, pending requests, receipts) per process, created on first use. After
`fork()` the child drops the parent's without touching it (an inherited socket "sends" into the
void) and creates its own on its next call. At exit, pending requests get `client.exit_wait`
seconds for their receipts and the rest are spilled to `client.overflow_dir`.
"""

import atexit
import mimetypes
import multiprocessing.util
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dispatcher import wire
from dispatcher.errors import InvalidRequest
from dispatcher.handoff import Handoff
from dispatcher.settings import Settings, load_settings

AttachmentInput = wire.Attachment | tuple[str, bytes] | tuple[str, bytes, str]


class _ProcessState:
    """The per-process client and the settings it is built from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Handoff | None = None
        self.settings: Settings | None = None  # None: found and loaded on first use

    def get(self) -> Handoff:
        with self.lock:
            if self.client is None:
                if self.settings is None:
                    self.settings = load_settings()
                self.client = Handoff(self.settings)
            return self.client

    def forget(self) -> None:
        """In a forked child: drop the parent's client without closing it (never use it)."""
        self.lock = threading.Lock()
        self.client = None

    def close(self) -> None:
        with self.lock:
            if self.client is not None:
                self.client.close(self.client.settings.exit_wait)
                self.client = None


_state = _ProcessState()
os.register_at_fork(after_in_child=_state.forget)
atexit.register(_state.close)
# A multiprocessing child ends with os._exit(), which skips atexit but runs these finalizers.
multiprocessing.util.Finalize(None, _state.close, exitpriority=0)


def configure(settings_path: str | os.PathLike[str] | None = None, **overrides: Any) -> None:
    """Load and check the settings now, so a mistake fails at boot rather than in a request,
    and the first `enqueue_email()` does not pay for it (~25 ms, mostly email-validator).

    Overrides are sections as mappings (`client={"connect": ["tcp://10.0.0.5:5559"]}`) or
    dotted keys with `__` (`smtp__port=2525`). Sockets are still made lazily, per process.
    Raises `SettingsError` (a `ValueError`) for a missing file or a bad key.
    """
    settings = load_settings(settings_path, overrides)
    _state.close()
    _state.settings = settings


def enqueue_email(
    template: str,
    /,
    *,
    to: str | Sequence[str],
    context: Mapping[str, Any] | None = None,
    cc: str | Sequence[str] | None = None,
    bcc: str | Sequence[str] | None = None,
    reply_to: str | Sequence[str] | None = None,
    sender: str | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[AttachmentInput] | None = None,
    send_at: datetime | None = None,
    priority: str = "normal",
    idempotency_key: str | None = None,
    locale: str | None = None,
) -> str:
    """Queue one email for the daemon and return its request id at once.

    Raises `InvalidRequest` (a `ValueError`) for input that could never be sent. Never blocks
    on the daemon and never raises because it is down: the request is kept until a daemon
    acknowledges it, or written to `client.overflow_dir`. Addresses are checked by shape here
    and fully (email-validator) by the daemon, which records a failure as rejected.
    """
    handoff = _state.client or _state.get()
    request_id = handoff.new_id()
    fields: dict[str, Any] = {"v": wire.VERSION, "id": request_id, "client": handoff.client_id,
                              "template": template, "to": _wire_value(to)}  # fmt: skip
    if context is not None:
        fields["context"] = context if isinstance(context, dict) else _wire_value(context)
    if (
        cc is not None or bcc is not None or reply_to is not None or sender is not None
        or headers is not None or attachments is not None or send_at is not None
        or idempotency_key is not None or locale is not None or priority != "normal"
    ):  # fmt: skip
        fields.update(
            _options(cc=cc, bcc=bcc, reply_to=reply_to, sender=sender, headers=headers,
                     attachments=attachments, send_at=send_at, priority=priority,
                     idempotency_key=idempotency_key, locale=locale)
        )  # fmt: skip
    handoff.submit(request_id, wire.encode_checked(fields))
    return request_id


def build_frame(
    template: str, /, *, client: str | None = None, **options: Any
) -> tuple[str, bytes]:
    """Check a request given as `enqueue_email()` arguments; returns its new id and frame."""
    request_id = wire.new_id()
    fields: dict[str, Any] = {"v": wire.VERSION, "id": request_id, "template": template}
    if client is not None:
        fields["client"] = client
    fields.update(_options(**options))
    return request_id, wire.encode_checked(fields)


def flush(timeout: float = 5.0) -> bool:
    """Wait until every request of this process is acknowledged by a daemon or spilled.

    True when all were acknowledged (none spilled since the last flush). Whatever is still
    unacknowledged at `timeout` is spilled before returning, so it is durable either way.
    """
    return _state.get().flush(timeout)


def _options(**options: Any) -> dict[str, Any]:
    """The given options in wire form (files in base64, times as ISO 8601)."""
    fields = {}
    for name, value in options.items():
        if value is None:
            continue
        if name == "attachments":
            value = [_attachment(a) for a in value]
        elif name == "send_at":
            value = _send_at(value)
        fields[name] = _wire_value(value)
    return fields


def _wire_value(value: Any) -> Any:
    """What orjson encodes as JSON: a mapping as a dict, a tuple of addresses as a list."""
    if isinstance(value, (str, dict, list)):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _attachment(item: AttachmentInput) -> dict[str, str]:
    if isinstance(item, wire.Attachment):
        return wire.attachment_fields(item)
    if not isinstance(item, tuple) or len(item) not in (2, 3):
        raise InvalidRequest(
            "attachments: expected (filename, content) or (filename, content, type)"
        )
    filename, content = item[0], item[1]
    if not isinstance(content, bytes):
        raise InvalidRequest(f"attachments: content of {filename!r} must be bytes")
    guessed = mimetypes.guess_type(Path(str(filename)).name)[0] or "application/octet-stream"
    content_type = item[2] if len(item) == 3 else guessed
    return wire.attachment_fields(wire.Attachment(filename, content_type, content))


def _send_at(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise InvalidRequest("send_at: expected a timezone-aware datetime")
    return moment.isoformat()
