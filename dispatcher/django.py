"""`EMAIL_BACKEND = "dispatcher.django.EmailBackend"`: Django's mail goes through the daemon.

Django builds each message as it always does (`EmailMessage.message()`: alternatives,
attachments, inline images, its own headers and encodings) and the backend hands the bytes over
with `enqueue_raw()`, so what Django can express arrives as Django wrote it. Inside
`transaction.atomic()` the request is checked at once and handed over on commit, or dropped on
rollback (`DISPATCHER_ON_COMMIT = False` hands it over at once). `DISPATCHER_SETTINGS` (a Django
setting) names the dispatcher's settings file; without it the usual lookup applies
(`configure()`, the `DISPATCHER_SETTINGS` environment variable, `./settings.yaml`).
"""

import functools
from collections.abc import Sequence
from typing import Any

from django.conf import settings as django_settings
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import EmailMessage, sanitize_address
from django.db import transaction

from dispatcher.client import Client, default_client
from dispatcher.deferred import defer
from dispatcher.errors import DispatcherError
from dispatcher.settings import load_settings


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]  # Django ships no type hints
    """Queues Django's messages with the dispatcher; `send_messages` returns how many were
    accepted (queued, or waiting for the commit), as Django's backends return those sent."""

    def __init__(self, fail_silently: bool = False, **kwargs: Any) -> None:
        # Django's SMTP options (host, port, username, timeout, ...) are the daemon's to know.
        super().__init__(fail_silently=fail_silently)
        self.on_commit: bool = getattr(django_settings, "DISPATCHER_ON_COMMIT", True)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Queue each message; with `fail_silently`, one that can never be sent is skipped
        instead of raising (its `InvalidRequest` says why)."""
        sent = 0
        for message in email_messages or ():
            try:
                sent += self.send_one(message)
            except DispatcherError:  # as Django's SMTP backend: its own errors still raise
                if not self.fail_silently:
                    raise
        return sent

    def send_one(self, message: EmailMessage) -> bool:
        """Queue one message; False for one without recipients (Django skips those too)."""
        if not message.recipients():
            return False
        encoding = message.encoding or django_settings.DEFAULT_CHARSET
        options: dict[str, Any] = {
            "raw": message.message(),
            "envelope_from": addr_spec(message.from_email, encoding),
            "recipients": [addr_spec(a, encoding) for a in message.recipients()],
        }
        if self.on_commit:
            enqueue_after_commit(None, **options)
        else:
            client().enqueue_raw(options.pop("raw"), **options)
        return True


def enqueue_after_commit(template: str | None = None, /, **options: Any) -> str:
    """`enqueue_email(template, ...)` (without one: `enqueue_message(...)`, or with `raw=` a
    built message, as `enqueue_raw()`), handed over when the current `transaction.atomic()`
    block commits, dropped if it rolls back; at once outside one. Checked now: returns the
    request id, or raises `InvalidRequest`."""
    request = defer(template, options)
    if not transaction.get_connection().in_atomic_block:
        return request.send(client())
    transaction.on_commit(functools.partial(request.send, client()))
    return request.id


def addr_spec(address: str, encoding: str) -> str:
    """The address alone, as Django's SMTP backend writes it into the envelope (punycode)."""
    sanitized: str = sanitize_address(address, encoding)
    return sanitized.rpartition("<")[2].rstrip(">") if sanitized.endswith(">") else sanitized


def client() -> Client:
    """The client of the `DISPATCHER_SETTINGS` Django setting, else the default client."""
    path = getattr(django_settings, "DISPATCHER_SETTINGS", None)
    return default_client() if path is None else _client_for(str(path))


@functools.cache
def _client_for(path: str) -> Client:
    return Client(load_settings(path))
