"""dispatcher: transactional email that never slows a request and is never silently lost."""

from dispatcher.client import configure, enqueue_email, flush
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
    "DispatcherError",
    "InvalidRequest",
    "RequestTooLarge",
    "SettingsError",
    "TemplateError",
    "UsageError",
    "__version__",
    "configure",
    "enqueue_email",
    "flush",
]
