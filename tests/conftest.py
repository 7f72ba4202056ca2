"""Shared fixtures: a real aiosmtpd server with injectable faults; real daemons, preview servers
and `dispatcher dev`, each in a process of its own or in this one; a real PostgreSQL."""

from tests.daemon import fresh_client, run_daemon, start_daemon  # noqa: F401  (fixtures)
from tests.disks import small_disk  # noqa: F401  (fixture)
from tests.postgres import postgres_server, postgres_url, store  # noqa: F401  (fixtures)
from tests.smtp_server import smtp_server  # noqa: F401  (fixture)
from tests.ui import preview, run_dev, start_ui  # noqa: F401  (fixtures)
