"""dispatcher: transactional email that never slows a request and is never silently lost."""

from dispatcher.client import (
    Client,
    configure,
    enqueue_email,
    enqueue_message,
    enqueue_raw,
    flush,
)
from dispatcher.errors import (
    DispatcherError,
    InvalidRequest,
    RequestTooLarge,
    SettingsError,
    TemplateError,
    UsageError,
)

__version__ = "0.1.0"
__all__ = [
    "Client",
    "DispatcherError",
    "InvalidRequest",
    "RequestTooLarge",
    "SettingsError",
    "TemplateError",
    "UsageError",
    "__version__",
    "configure",
    "enqueue_email",
    "enqueue_message",
    "enqueue_raw",
    "flush",
]
