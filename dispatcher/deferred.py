"""Requests checked now and handed over later: when the transaction that asked for them commits.

A mail about a signup must not go out for a signup that rolled back, yet a request that can never
be sent must fail in the code that asked for it, not in a commit hook. So the request is made and
checked at once (its frame is a snapshot: later changes to the caller's objects do not leak in)
and handed to a client only when the caller says so (`send`), or never.
"""

from dataclasses import dataclass
from typing import Any

import orjson

from dispatcher import wire
from dispatcher.client import Client, default_client


@dataclass(frozen=True, slots=True)
class Deferred:
    """A checked request waiting for its transaction; `id` is its request id from now on."""

    id: str
    frame: bytes  # its fields, checked, without the `client` a hand-over adds

    def send(self, client: Client | None = None) -> str:
        """Hand it over now (to the default client unless told otherwise)."""
        return (client or default_client())._enqueue_fields(orjson.loads(self.frame))


def defer(template: str | None, options: Any) -> Deferred:
    """Make and check a request of any kind, as `enqueue_email()` (a template), or
    `enqueue_message()` (None and the parts), or `enqueue_raw()` (None and `raw`) would.

    Raises `InvalidRequest` now for what could never be sent.
    """
    fields = wire.request_fields(template, options)
    return Deferred(fields["id"], wire.encode(fields))
