"""Shared fixtures: a real aiosmtpd server with injectable faults, real daemons (in a process
of their own or in this one) and real preview / dev processes."""

from tests.daemon import fresh_client, run_daemon, start_daemon  # noqa: F401  (fixtures)
from tests.smtp_server import smtp_server  # noqa: F401  (fixture)
from tests.ui import start_ui  # noqa: F401  (fixture)
