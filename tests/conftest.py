"""Shared fixtures: a real aiosmtpd server with injectable faults, daemons, settings files."""

from tests.smtp_server import smtp_server  # noqa: F401  (fixture)
