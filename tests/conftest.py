"""Shared fixtures: a real aiosmtpd server with injectable faults, real daemon processes and
real preview / dev processes."""

from tests.daemon import fresh_client, start_daemon  # noqa: F401  (fixtures)
from tests.smtp_server import smtp_server  # noqa: F401  (fixture)
from tests.ui import start_ui  # noqa: F401  (fixture)
