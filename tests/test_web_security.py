"""The preview and dev servers as a hostile web page would try them: a rebound DNS name (another
Host header), framing, caching of captured mail. Raw `http.client`, so the Host header is ours."""

import http.client
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.daemon import run_cli
from tests.test_dev import dev_settings, wait_for_outbox
from tests.ui import InProcessDev, InProcessPreview, Page

RunDev = Callable[..., InProcessDev]
PAGES = ("/", "/templates/invoice", "/templates/invoice/paid", "/templates/invoice/paid/eml")


def request(url: str, path: str, host: str | None, method: str = "GET") -> Page:
    """One request to the server at `url` with exactly this Host header (None: none at all)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        connection.putrequest(method, path, skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return Page(response.status, response.headers, response.read())
    finally:
        connection.close()


def port(url: str) -> int:
    return urlsplit(url).port or 80


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "LocalHost", "[::1]"])
def test_loopback_hosts_with_the_port_are_answered(preview: InProcessPreview, name: str) -> None:
    for path in PAGES:
        assert request(preview.url, path, f"{name}:{port(preview.url)}").status == 200, path


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{port}",
        "evil.example",
        "localhost",
        "127.0.0.1:1",
        "localhost.evil:{port}",
        "127.0.0.2:{port}",
        "",
        None,
    ],
)
def test_any_other_host_gets_a_one_line_403(preview: InProcessPreview, host: str | None) -> None:
    shown = None if host is None else host.format(port=port(preview.url))
    for path in PAGES:
        page = request(preview.url, path, shown)
        assert page.status == 403, (path, shown)
        assert page.headers["Content-Type"].startswith("text/plain")
        assert page.text.count("\n") == 1 and "DNS rebinding" in page.text
        assert page.headers["X-Frame-Options"] == "DENY"


def test_head_answers_as_get_without_a_body(preview: InProcessPreview) -> None:
    host = f"localhost:{port(preview.url)}"
    for path in (*PAGES, "/nowhere"):
        get, head = request(preview.url, path, host), request(preview.url, path, host, "HEAD")
        assert (head.status, head.raw) == (get.status, b""), path
        assert without_date(head) == without_date(get), path
    assert request(preview.url, "/", "evil.example", "HEAD").status == 403


def without_date(page: Page) -> list[tuple[str, str]]:
    """The headers but Date, which may tick between two requests."""
    return [(name, value) for name, value in page.headers.items() if name != "Date"]


def test_pages_refuse_framing_but_the_mail_part_is_framable_by_the_preview(
    preview: InProcessPreview,
) -> None:
    host = f"127.0.0.1:{port(preview.url)}"
    for path in (*PAGES, "/version", "/static/preview.css", "/nowhere"):
        page = request(preview.url, path, host)
        assert page.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"], path
    part = request(preview.url, "/templates/invoice/paid/html", host)
    assert part.status == 200 and "X-Frame-Options" not in part.headers
    assert "frame-ancestors 'self'" in part.headers["Content-Security-Policy"]


def test_dev_refuses_a_rebound_host_and_never_lets_captured_mail_be_cached(
    run_dev: RunDev, tmp_path: Path
) -> None:
    settings = dev_settings(tmp_path)
    ui = run_dev(settings)
    sent = run_cli("send", "welcome", "--to", "me@example.com", settings=settings)
    assert sent.returncode == 0, sent.stderr
    (message_id,) = wait_for_outbox(ui, 1)
    paths = ("/outbox", f"/outbox/{message_id}", f"/outbox/{message_id}/eml", "/")
    for path in (*paths, f"/outbox/{message_id}/html"):
        assert request(ui.url, path, f"evil.example:{port(ui.url)}").status == 403, path
        page = request(ui.url, path, f"localhost:{port(ui.url)}")
        assert page.status == 200, path
        assert page.headers["Cache-Control"] == "no-store", path
    assert request(ui.url, "/outbox", f"localhost:{port(ui.url)}", "HEAD").raw == b""
