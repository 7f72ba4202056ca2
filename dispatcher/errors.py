"""One error root for everything the dispatcher raises on purpose.

Leaves also inherit the stdlib class a caller would naturally catch (`ValueError` for bad
input), so `except ValueError` around `enqueue_email()` does what users expect.
"""


class DispatcherError(Exception):
    """Raised for any failure the dispatcher reports on purpose."""


class SettingsError(DispatcherError, ValueError):
    """Raised when a settings file or override is missing, malformed or names an unknown key."""


class InvalidRequest(DispatcherError, ValueError):
    """Raised when a request can never be sent: bad address, header, priority or context."""


class RequestTooLarge(InvalidRequest):
    """Raised when an encoded request exceeds the wire protocol's size limit."""


class UsageError(DispatcherError, ValueError):
    """Raised when a command is used wrongly: a bad argument, or a key it would overwrite."""


class NotFound(UsageError):
    """Raised when a named template, sample, message or file does not exist."""


class TemplateError(DispatcherError):
    """Raised when a template is missing, does not compile or fails to render.

    `location` is `file:line` when Jinja could tell where the error is, so the message reads
    like a compiler error and points at the template a developer has to fix.
    """

    def __init__(self, message: str, location: str | None = None) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


class StartupError(DispatcherError):
    """Raised when the daemon cannot start: a socket cannot be bound, the spool not opened."""


class SpoolError(DispatcherError):
    """Raised when the spool cannot be opened or read: missing, unreadable, or of a newer schema."""


class StoreUnavailable(SpoolError):
    """Raised by a spool when a write fails for a reason that may pass (disk full, database down).

    Nothing of the failed write was kept; the daemon stops acknowledging, keeps running and
    tries again, so the caller must never treat it as the end of the daemon or of a request.
    """
