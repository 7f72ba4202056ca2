"""Shared fixtures: a real aiosmtpd server with injectable faults; real daemons and preview
servers, each in a process of its own or in this one; real `dispatcher dev` processes."""

from tests.daemon import fresh_client, run_daemon, start_daemon  # noqa: F401  (fixtures)
from tests.smtp_server import smtp_server  # noqa: F401  (fixture)
from tests.ui import preview, start_ui  # noqa: F401  (fixtures)
