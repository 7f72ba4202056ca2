"""The app side: `Client.enqueue_email()` checks, encodes and hands a request over without waiting.

A `Client` owns one `Handoff` (sockets, pending requests, receipts) per process, made on first
use. After `fork()` the child drops the parent's without touching it (an inherited socket
"sends" into the void) and makes its own on its next call. At exit, every client's pending
requests get `client.exit_wait` seconds for their receipts and the rest are spilled to
`client.overflow_dir`. The module functions use one default client per process.
"""

import atexit
import os
import sys
import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, Unpack

from dispatcher import overflow, wire
from dispatcher.errors import SettingsError
from dispatcher.handoff import Handoff
from dispatcher.settings import Settings, load_settings

if TYPE_CHECKING:
    import email.message

_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()  # every open client, to close at exit


class Client:
    """Hands requests to the daemons of `settings` and keeps each until a daemon has it."""

    def __init__(self, settings: Settings) -> None:
        """Raises `SettingsError` when `client.overflow_dir` cannot be created or written."""
        check_overflow_dir(settings)
        self.settings = settings
        self._lock = threading.Lock()
        self._handoff: Handoff | None = None  # made on first use, in each process
        _clients.add(self)

    def enqueue_email(self, template: str, /, **options: Unpack[wire.EmailOptions]) -> str:
        """Queue one email for the daemon and return its request id at once.

        Raises `InvalidRequest` (a `ValueError`) for input that could never be sent. Never
        blocks on the daemon and never raises because it is down: the request is kept until a
        daemon acknowledges it, or written to `client.overflow_dir`. Addresses are checked by
        shape here and fully (email-validator) by the daemon, which records a failure as dead.
        """
        return self._enqueue(template, options)

    def enqueue_message(self, **options: Unpack[wire.MessageOptions]) -> str:
        """Queue one email given as its parts (`subject`, `text` and/or `html`), no template.

        The same options, checks, limits and guarantees as `enqueue_email()`; without `text`
        the text part is derived from `html`, as for a template without body.txt.
        """
        return self._enqueue(None, options)

    def enqueue_raw(
        self, message: "email.message.Message | bytes", /, **options: Unpack[wire.RawOptions]
    ) -> str:
        """Queue a message the app built (an `EmailMessage`, or RFC 5322 bytes) as it is.

        Recipients default to its To, Cc and Bcc; the Bcc field is never sent. From (from
        `mail.from`), Date and Message-ID are added when missing. Its header block is checked
        as strictly as the dispatcher's own: an injected line raises `InvalidRequest`.
        """
        return self._enqueue(None, {**options, "raw": message})

    def _enqueue_fields(self, fields: dict[str, Any]) -> str:
        """Hand over a request made and checked earlier (`dispatcher.deferred`)."""
        handoff = self._handoff or self._start()
        fields["client"] = handoff.client_id
        handoff.submit(fields["id"], wire.encode(fields))
        return str(fields["id"])

    def _enqueue(
        self,
        template: str | None,
        options: wire.EmailOptions | wire.MessageOptions | wire.RawOptions,
    ) -> str:
        """`enqueue_email()`, with its options as one dict: passed on, not unpacked again."""
        handoff = self._handoff or self._start()
        request_id = handoff.new_id()
        fields = wire.request_fields(template, options, id=request_id, client=handoff.client_id)
        handoff.submit(request_id, wire.encode(fields))
        return request_id

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every request of this client is acknowledged by a daemon or spilled.

        True when all were acknowledged (none spilled since the last flush). Whatever is still
        unacknowledged at `timeout` is spilled before returning, so it is durable either way;
        False too when some could not be spilled (a full disk): those stay in memory and are
        tried again.
        """
        return (self._handoff or self._start()).flush(timeout)

    @property
    def resent(self) -> int:
        """Requests sent a second time for want of a receipt, by this process: a daemon
        that keeps up sends its receipts in time, so this stays 0."""
        return 0 if self._handoff is None else self._handoff.resent

    @property
    def unsaved(self) -> int:
        """Requests of this process held only in its memory, neither acknowledged by a daemon
        nor written to `client.overflow_dir`: after a `flush()`, those that folder refused."""
        return 0 if self._handoff is None else self._handoff.unsaved()

    def close(self) -> None:
        """Wait up to `client.exit_wait` for receipts, spill the rest and release the sockets.

        A closed client opens again on its next call.
        """
        with self._lock:
            handoff, self._handoff = self._handoff, None
        if handoff is not None:
            handoff.close(self.settings.client.exit_wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> Handoff:
        with self._lock:
            if self._handoff is None:
                _close_at_multiprocessing_exit()
                self._handoff = Handoff(self.settings)
            return self._handoff

    def _forget(self) -> None:
        """In a forked child: drop the parent's hand-off without closing it (never use it)."""
        self._lock = threading.Lock()
        self._handoff = None


class _Default:
    """This process's default client, and the settings `configure()` gave it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Client | None = None
        self.settings: Settings | None = None  # None: found and loaded on first use
        self.finalized_in: int | None = None  # the pid whose multiprocessing exit closes us

    def get(self) -> Client:
        with self.lock:
            if self.client is None:
                self.client = Client(self.settings or load_settings(client_only=True))
            return self.client

    def forget(self) -> None:
        """In a forked child: the parent's default client is not ours."""
        self.lock = threading.Lock()
        self.client = None

    def close(self) -> None:
        with self.lock:
            client, self.client = self.client, None
        if client is not None:
            client.close()


def _forget_in_child() -> None:
    for client in list(_clients):
        client._forget()
    _state.forget()


def _close_all() -> None:
    for client in list(_clients):
        client.close()


def _close_at_multiprocessing_exit() -> None:
    """A multiprocessing child ends with os._exit(), which skips atexit but runs the
    finalizers registered in that child (its start clears the parent's). Registered when a
    process first hands over, and only where multiprocessing is loaded, as it is in each of
    its children: importing it costs `import dispatcher` ~7 ms."""
    if _state.finalized_in == os.getpid() or "multiprocessing" not in sys.modules:
        return
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _close_all, exitpriority=0)
    _state.finalized_in = os.getpid()


_state = _Default()
os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_close_all)


def configure(settings_path: str | os.PathLike[str] | None = None, **overrides: Any) -> None:
    """Load and check the settings now, so a mistake fails at boot rather than in a request,
    and the first `enqueue_email()` does not pay for it.

    Overrides are sections as mappings (`client={"connect": ["tcp://10.0.0.5:5559"]}`) or
    dotted keys with `__` (`smtp__port=2525`). Sockets are still made lazily, per process.
    Raises `SettingsError` (a `ValueError`) for a missing file, a bad key, or a
    `client.overflow_dir` that cannot be created or written.
    """
    settings = load_settings(settings_path, overrides, client_only=True)
    check_overflow_dir(settings)
    _state.close()
    _state.settings = settings


def check_overflow_dir(settings: Settings) -> None:
    """Refuse at boot an overflow folder that cannot be made or written: what no daemon takes
    in time would find nowhere durable to go."""
    folder = settings.client.overflow_dir
    try:
        overflow.check_writable(folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(
            f"client.overflow_dir: cannot create or write {folder}: {reason}"
        ) from None


def enqueue_email(template: str, /, **options: Unpack[wire.EmailOptions]) -> str:
    """`Client.enqueue_email()` on this process's default client (see `configure()`)."""
    return (_state.client or _state.get())._enqueue(template, options)


def enqueue_message(**options: Unpack[wire.MessageOptions]) -> str:
    """`Client.enqueue_message()` on this process's default client."""
    return (_state.client or _state.get())._enqueue(None, options)


def enqueue_raw(
    message: "email.message.Message | bytes", /, **options: Unpack[wire.RawOptions]
) -> str:
    """`Client.enqueue_raw()` on this process's default client: `envelope_from`,
    `recipients`, `send_at`, `priority`, `idempotency_key`."""
    return default_client().enqueue_raw(message, **options)


def default_client() -> Client:
    """This process's default client: the one the module functions use."""
    return _state.client or _state.get()


def flush(timeout: float = 5.0) -> bool:
    """`Client.flush()` on this process's default client."""
    return _state.get().flush(timeout)


def close() -> None:
    """`Client.close()` on this process's default client; the next call makes a new one."""
    _state.close()
