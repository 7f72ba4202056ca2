"""SMTP over TLS verifies the server's certificate; credentials never travel in clear unnoticed.

The servers are aiosmtpd protocol instances on 127.0.0.1 with a self-signed certificate made
by the `openssl` command for this test run: implicit TLS (`security: tls`) and STARTTLS.
"""

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import SMTP

from dispatcher.settings import SmtpSettings
from dispatcher.transport import Attempt, SmtpConnection, credential_warnings
from tests.daemon import run_cli, write_settings
from tests.test_transport import ADA, SENDER, message

T = TypeVar("T")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert.pem, key.pem): self-signed for 127.0.0.1, so only an explicit CA file trusts it."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=smtp.test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class Collect:
    """aiosmtpd handler keeping every envelope it accepts."""

    def __init__(self) -> None:
        self.received: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope)
        return "250 OK"


def deliver_over_tls(
    certificate: tuple[Path, Path], security: str, ca_file: Path | None
) -> tuple[Attempt, Collect]:
    """Serve one connection's worth of SMTP with TLS on a free port and deliver one message."""
    return over_tls(certificate, security, ca_file, lambda c: c.deliver(SENDER, [ADA], message()))


def over_tls(
    certificate: tuple[Path, Path],
    security: str,
    ca_file: Path | None,
    use: Callable[[SmtpConnection], Awaitable[T]],
) -> tuple[T, Collect]:
    """Serve SMTP with TLS on a free port while `use` works with a connection to it."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*certificate)
    handler = Collect()
    starttls = {"tls_context": server_context, "require_starttls": True}

    def factory() -> SMTP:
        return SMTP(handler, hostname="smtp.test", **(starttls if security == "starttls" else {}))

    tls = server_context if security == "tls" else None

    async def run() -> T:
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        settings = SmtpSettings(host="127.0.0.1", port=port, security=security,  # type: ignore[arg-type]
                                timeout=10, ca_file=ca_file)  # fmt: skip
        try:
            async with SmtpConnection(settings) as connection:
                return await use(connection)
        finally:
            server.close()

    return asyncio.run(run()), handler


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_an_untrusted_certificate_is_deferred_and_nothing_is_sent(
    certificate: tuple[Path, Path], security: str
) -> None:
    attempt, server = deliver_over_tls(certificate, security, ca_file=None)
    assert ADA in attempt.deferred
    assert "CERTIFICATE_VERIFY_FAILED" in attempt.reply
    assert server.received == []


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_the_servers_ca_in_smtp_ca_file_delivers(
    certificate: tuple[Path, Path], security: str
) -> None:
    attempt, server = deliver_over_tls(certificate, security, ca_file=certificate[0])
    assert attempt.delivered == (ADA,), attempt.reply
    assert [e.rcpt_tos for e in server.received] == [[ADA]]


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_check_relays_verifies_the_certificate_and_names_the_step_that_failed(
    certificate: tuple[Path, Path], security: str
) -> None:
    (steps, failure), _ = over_tls(certificate, security, certificate[0], lambda c: c.check())
    assert failure is None
    assert steps == (["TLS", "EHLO"] if security == "tls" else ["connected", "EHLO", "STARTTLS"])
    (steps, failure), server = over_tls(certificate, security, None, lambda c: c.check())
    assert failure is not None and "CERTIFICATE_VERIFY_FAILED" in failure
    assert failure.startswith("connect: " if security == "tls" else "STARTTLS: ")
    assert server.received == []


def test_credentials_in_clear_to_another_host_are_warned_about() -> None:
    plain = SmtpSettings(host="smtp.example.com", username="mailer", security="none")
    assert "without TLS" in credential_warnings(plain)[0]
    assert credential_warnings(SmtpSettings(host="smtp.example.com", username="mailer",
                                            security="starttls")) == []  # fmt: skip
    assert credential_warnings(SmtpSettings(host="127.0.0.1", username="mailer")) == []
    assert credential_warnings(SmtpSettings(host="smtp.example.com")) == []


def test_check_prints_the_warning_but_passes_and_never_the_password(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("hunter2-secret\n")
    settings = write_settings(
        tmp_path, 587, smtp={"host": "smtp.example.com", "username": "mailer",
                             "password_file": str(password)},
    )  # fmt: skip
    result = run_cli("check", settings=settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: smtp: the username and password would be sent to smtp.example.com" in (
        result.stdout
    )
    assert "hunter2" not in result.stdout + result.stderr
