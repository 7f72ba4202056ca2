"""The loopback test behind intake.bind, metrics.bind, `dispatcher dev` and credential warnings."""

import pytest

from dispatcher.hosts import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("*", False),
        ("", False),
        ("localhost.example.com", False),
        ("eth0", False),
    ],
)
def test_only_localhost_and_loopback_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
