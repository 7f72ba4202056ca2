"""Shared fixtures: a real aiosmtpd server with injectable faults, and real daemon processes."""

from tests.daemon import start_daemon  # noqa: F401  (fixture)
from tests.smtp_server import smtp_server  # noqa: F401  (fixture)
