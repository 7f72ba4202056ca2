"""Issue 16 as a new user meets it: a template in three languages with an inline logo, sent
through a real daemon to a real SMTP server, DKIM-signed, with one-click unsubscribe."""

import base64
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

import dispatcher
from dispatcher import dkim as dispatcher_dkim
from dispatcher.spool.sqlite import SqliteReader
from tests.content_templates import CONTEXT, LOGO, UNSUBSCRIBE, write_order_templates
from tests.daemon import InProcessDaemon, write_settings
from tests.smtp_server import SmtpServer, free_port

RunDaemon = Callable[..., InProcessDaemon]


def dns_stub(record: str, name: bytes = b"s1._domainkey.example.com.") -> Callable[..., bytes]:
    """What DNS would answer for the selector's TXT record: dkimpy's verify asks this."""

    def lookup(asked: bytes, timeout: float = 5) -> bytes:
        return record.encode() if asked == name else b""

    return lookup


def test_a_new_user_sends_localized_signed_mail_with_an_inline_logo(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    templates = write_order_templates(tmp_path)
    key, _, record = dispatcher_dkim.keygen("s1", tmp_path / "keys", "ed25519-sha256")
    metrics_port = free_port()
    settings = write_settings(
        tmp_path,
        smtp_server.port,
        templates={"dir": str(templates), "locale": "en"},
        metrics={"bind": f"127.0.0.1:{metrics_port}"},
        dkim={"domain": "example.com", "selector": "s1", "key_file": str(key),
              "algorithm": "ed25519-sha256"},
    )  # fmt: skip
    # Render workers, as in production: the worker processes need the key too.
    daemon = run_daemon(settings, render_processes=1)
    dispatcher.configure(settings)
    smtp_server.fail_data_per_message(1)  # every message is sent twice: the retry re-signs nothing
    ids = {}
    for locale in ("de", "de-AT", "fr", "ja"):
        ids[locale] = dispatcher.enqueue_email(
            "order",
            to=f"{locale}@example.com",
            context=CONTEXT,
            locale=locale,
            timezone="Europe/Vienna",
            tags=["spring-sale"],
            metadata={"customer": 42},
        )
    assert dispatcher.flush(5.0)
    received = {m.rcpt_tos[0].partition("@")[0]: m for m in smtp_server.wait_for(4, timeout=30)}
    daemon.wait_for_counts(sent=4)

    expected = {  # subject, date in Vienna (23:30 UTC is the next day there), amount, <html lang>
        "de": ("Ihre Bestellung 42", "2. März 2025", "1.234,50\xa0€", "de"),
        "de-AT": ("Ihre Bestellung 42", "2. März 2025", "€\xa01.234,50", "de-AT"),
        "fr": ("Votre commande 42", "2 mars 2025", "1\u202f234,50\xa0€", "fr"),
        "ja": ("Your order 42", "March 2, 2025", "€1,234.50", "en"),  # no ja files: the default
    }
    for locale, (subject, day, amount, lang) in expected.items():
        message = received[locale].message
        assert message["Subject"] == subject
        html_part = message.get_body(("html",))
        assert html_part is not None
        html = html_part.get_content()
        assert day in html and amount in html and f'<html lang="{lang}">' in html
        # The logo: once, inside multipart/related, named by the HTML's cid: URL.
        related = next(p for p in message.walk() if p.get_content_type() == "multipart/related")
        images = [p for p in related.iter_parts() if p.get_content_type() == "image/png"]
        assert len(images) == 1 and images[0].get_content() == LOGO
        cid = images[0]["Content-ID"].strip("<>")
        assert html.count(f'src="cid:{cid}"') == 2
        # One-click unsubscribe, from template.yaml, and covered by the signature.
        assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        signature = str(message["DKIM-Signature"])
        assert "a=ed25519-sha256" in signature and "list-unsubscribe-post" in signature
        data = received[locale].data
        assert dkim.verify(data, dnsfunc=dns_stub(record))
        body_at = data.index(b"\r\n\r\n") + 4
        changed = data[:body_at] + data[body_at:].replace(b"--=_", b"--=X", 1)
        assert not dkim.verify(changed, dnsfunc=dns_stub(record))

    with SqliteReader(daemon.settings.spool.path) as spool:
        for locale, request_id in ids.items():
            report = spool.inspect(request_id)
            assert report is not None and len(report["attempt_log"]) == 2
            assert report["message"] == received[locale].data  # signed once, sent as stored
        assert spool.tag_counts("spring-sale")["sent"] == 4
        assert spool.tag_counts("orders")["sent"] == 0  # the template's tag, without its name
        assert spool.tag_counts("orders", ["order"])["sent"] == 4
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as got:
        metrics = got.read().decode()
    assert "dispatcher_" in metrics and "spring-sale" not in metrics and "orders" not in metrics


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signature_verifies_and_breaks_when_one_body_byte_changes(
    tmp_path: Path, algorithm: str
) -> None:
    from dispatcher.render import Renderer
    from dispatcher.settings import DkimSettings

    key, public, record = dispatcher_dkim.keygen("s1", tmp_path, algorithm)
    assert key.stat().st_mode & 0o777 == 0o600
    assert public.read_text().strip() == record
    settings = DkimSettings("example.com", "s1", key, algorithm)  # type: ignore[arg-type]
    renderer = Renderer(write_order_templates(tmp_path), "Shop <shop@example.com>", dkim=settings)
    message = renderer.signed(renderer.render_example("order", CONTEXT))
    assert message.data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(message.data, dnsfunc=dns_stub(record))
    body_at = message.data.index(b"\r\n\r\n") + 4
    for offset in (body_at, len(message.data) - 3):  # the first body byte, then the last
        byte = message.data[offset : offset + 1]
        flipped = b"Y" if byte != b"Y" else b"Z"
        changed = message.data[:offset] + flipped + message.data[offset + 1 :]
        assert not dkim.verify(changed, dnsfunc=dns_stub(record))


def test_mail_from_another_domain_is_not_signed(tmp_path: Path) -> None:
    from dispatcher.render import Renderer
    from dispatcher.settings import DkimSettings

    key, _, _ = dispatcher_dkim.keygen("s1", tmp_path, "ed25519-sha256")
    settings = DkimSettings("example.org", "s1", key, "ed25519-sha256")
    renderer = Renderer(write_order_templates(tmp_path), "Shop <shop@example.com>", dkim=settings)
    message = renderer.render_example("order", CONTEXT)
    assert renderer.signed(message).data == message.data
    sub = Renderer(renderer.templates_dir, "Shop <shop@mail.example.org>", dkim=settings)
    assert sub.signed(sub.render_example("order", CONTEXT)).data.startswith(b"DKIM-Signature:")


def test_a_key_that_does_not_fit_the_algorithm_is_a_settings_error(tmp_path: Path) -> None:
    from dispatcher.dkim import Signer
    from dispatcher.errors import SettingsError
    from dispatcher.settings import DkimSettings

    key, _, _ = dispatcher_dkim.keygen("s1", tmp_path, "ed25519-sha256")
    with pytest.raises(SettingsError, match=r"dkim\.key_file: .* is not a rsa-sha256 key"):
        Signer(DkimSettings("example.com", "s1", key, "rsa-sha256"))
    with pytest.raises(SettingsError, match=r"dkim\.key_file: cannot read"):
        Signer(DkimSettings("example.com", "s1", tmp_path / "missing", "rsa-sha256"))
    assert base64.b64decode(key.read_bytes())  # keygen wrote what dkimpy reads


def test_check_reads_the_dkim_key_and_says_what_it_signs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispatcher.cli import main

    key, _, _ = dispatcher_dkim.keygen("s1", tmp_path, "ed25519-sha256")
    dkim_settings = {"domain": "example.com", "selector": "s1", "algorithm": "ed25519-sha256"}
    good = write_settings(tmp_path, 1025, dkim={**dkim_settings, "key_file": str(key)})
    assert main(["check", "--settings", str(good)]) == 0
    assert f"dkim: key {key} signs mail from example.com" in capsys.readouterr().out
    bad = write_settings(tmp_path, 1025, dkim={**dkim_settings, "key_file": "missing.key"})
    assert main(["check", "--settings", str(bad)]) == 2
    assert "dispatcher: dkim.key_file: cannot read" in capsys.readouterr().err
