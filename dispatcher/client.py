"""The app side: `enqueue_email()` validates, encodes and pushes a request without waiting.

One ZeroMQ context and PUSH socket per process, created on first use. After `fork()` the child
drops the parent's objects without touching them (an inherited socket "sends" into the void)
and creates its own on its next call. Sockets are not thread-safe, so sends take a lock.
"""

import atexit
import logging
import mimetypes
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq

from dispatcher import wire
from dispatcher.errors import InvalidRequest
from dispatcher.settings import Settings, load_settings

log = logging.getLogger(__name__)

# How long the process may wait at exit for queued requests to leave (ZMQ_LINGER); the
# default of -1 would hang a web worker forever with the daemon down.
LINGER_MS = 1000
# A fresh IMMEDIATE socket refuses sends until its TCP handshake is done (~0.5 ms on loopback),
# so the first use waits this long, once per process, for a connection.
CONNECT_WAIT_MS = 50
SEND_HWM = 10_000

AttachmentInput = wire.Attachment | tuple[str, bytes] | tuple[str, bytes, str]


class Client:
    """A PUSH socket connected to every daemon in `client.connect`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = zmq.Context()
        self.context.linger = LINGER_MS
        self.socket = self.context.socket(zmq.PUSH)
        # IMMEDIATE: queue only on live connections, so "no daemon" is an error we can see
        # (zmq.Again) rather than messages piling up for a peer that may never come.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        from dispatcher.curve import secure_client_socket  # lazy: keeps `import dispatcher` light

        secure_client_socket(self.socket, settings.client)
        for endpoint in settings.client.connect:
            self.socket.connect(endpoint)
        self.lock = threading.Lock()
        self.not_handed_over = 0
        self.socket.poll(CONNECT_WAIT_MS, zmq.POLLOUT)

    def send(self, frame: bytes, request_id: str) -> bool:
        """Hand one frame to ZeroMQ without blocking; False when no daemon could take it."""
        with self.lock:
            try:
                self.socket.send(frame, zmq.NOBLOCK)
                return True
            except zmq.Again:
                self.not_handed_over += 1
        log.error(
            "request %s not handed over: no daemon reachable at %s or its queue is full",
            request_id,
            ", ".join(self.settings.client.connect),
        )
        return False

    def close(self) -> None:
        """Give queued requests up to LINGER_MS to leave, then release the socket."""
        self.socket.close(linger=LINGER_MS)
        self.context.term()


class _ProcessState:
    """The per-process client and where its settings come from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Client | None = None
        self.settings_path: str | os.PathLike[str] | None = None
        self.overrides: dict[str, Any] = {}

    def get(self) -> Client:
        with self.lock:
            if self.client is None:
                settings = load_settings(self.settings_path, self.overrides)
                self.client = Client(settings)
            return self.client

    def forget(self) -> None:
        """In a forked child: drop the parent's client without closing it (never use it)."""
        self.lock = threading.Lock()
        self.client = None

    def close(self) -> None:
        with self.lock:
            if self.client is not None:
                self.client.close()
                self.client = None


_state = _ProcessState()
os.register_at_fork(after_in_child=_state.forget)
atexit.register(_state.close)


def configure(settings_path: str | os.PathLike[str] | None = None, **overrides: Any) -> None:
    """Choose the settings file and overrides; takes effect on the next `enqueue_email()`.

    Overrides are sections as mappings (`client={"connect": ["tcp://10.0.0.5:5559"]}`) or
    dotted keys with `__` (`smtp__port=2525`).
    """
    _state.close()
    _state.settings_path = settings_path
    _state.overrides = dict(overrides)


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
    on the daemon and never raises because it is down: that is logged and counted.
    """
    request_id, frame = build_frame(
        template, to=to, context=context, cc=cc, bcc=bcc, reply_to=reply_to, sender=sender,
        headers=headers, attachments=attachments, send_at=send_at, priority=priority,
        idempotency_key=idempotency_key, locale=locale,
    )  # fmt: skip
    _state.get().send(frame, request_id)
    return request_id


def build_frame(template: str, /, **options: Any) -> tuple[str, bytes]:
    """Validate a request given as `enqueue_email()` arguments; returns its new id and frame."""
    request_id = wire.new_id()
    fields: dict[str, Any] = {"v": wire.VERSION, "id": request_id, "template": template}
    for name, value in options.items():
        if value is None:
            continue
        if name == "attachments":
            value = [_attachment(a) for a in value]
        elif name == "send_at":
            value = _send_at(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        fields[name] = value
    wire.validate(fields)
    return request_id, wire.encode(fields)


def flush(timeout: float = 5.0) -> bool:
    """True when every request of this process since the last flush was handed to a daemon.

    `timeout` bounds the wait; receipts from the daemon (a later protocol addition) will make
    this wait for the spool's acknowledgement.
    """
    del timeout
    client = _state.get()
    with client.lock:
        failed, client.not_handed_over = client.not_handed_over, 0
    return failed == 0


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
