"""`dispatcher preview` over HTTP: every route, the error page and live refresh, against the real
server on a templates folder it has never seen: in this process, or as the command for Ctrl-C."""

import email
import email.policy
import html
import socket
from collections.abc import Callable
from pathlib import Path

from tests.daemon import ROOT, run_cli, write_settings
from tests.test_cli import assert_one_line_error
from tests.ui import InProcessPreview, UiProcess

StartUi = Callable[..., UiProcess]


def test_index_lists_the_templates_and_samples_of_a_new_folder(preview: InProcessPreview) -> None:
    assert preview.url.startswith("http://127.0.0.1:")
    page = preview.get("/")
    assert page.status == 200
    assert 'href="/templates/invoice"' in page.text and 'href="/templates/notice"' in page.text
    assert 'href="/templates/invoice/paid"' in page.text
    assert 'href="/templates/invoice/overdue"' in page.text
    assert "_layouts" not in page.text.split("<main>")[1]  # a layout folder is no template
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_template_page_lists_its_samples_and_files(preview: InProcessPreview) -> None:
    page = preview.get("/templates/invoice")
    assert page.status == 200
    assert 'href="/templates/invoice/paid"' in page.text
    assert "body.html, preview.yaml, subject.txt" in page.text
    assert "text part is derived from body.html" in page.text
    notice = preview.get("/templates/notice")
    assert "No samples" in notice.text


def test_sample_page_shows_subject_addresses_and_a_sandboxed_iframe(
    preview: InProcessPreview,
) -> None:
    page = preview.get("/templates/invoice/overdue")
    assert page.status == 200
    assert '<h1 class="subject">Invoice B-99 for Linus &amp; Co</h1>' in page.text
    assert "Example &lt;noreply@example.com&gt;" in page.text  # From, from mail.from
    assert "recipient@example.com" in page.text
    assert '<iframe class="mail desktop" sandbox="" src="/templates/invoice/overdue/html"' in (
        page.text
    )
    mobile = preview.get("/templates/invoice/overdue/mobile")
    assert '<iframe class="mail mobile" sandbox=""' in mobile.text


def test_html_part_has_inlined_css_and_a_sandbox_policy(preview: InProcessPreview) -> None:
    part = preview.get("/templates/invoice/paid/html")
    assert part.status == 200
    policy = part.headers["Content-Security-Policy"]
    assert policy.startswith("sandbox;") and "script-src" not in policy
    assert '<p class="note" style="color: #0a7d32;font-weight: bold;">Amount due: 12.50 EUR' in (
        part.text
    )
    assert "@media (max-width: 480px)" in part.text  # at-rules cannot be inlined: kept


def test_text_and_headers_views(preview: InProcessPreview) -> None:
    text = preview.get("/templates/invoice/paid/text")
    assert "Pay now (https://example.com/pay/A-17)" in html.unescape(text.text)
    headers = preview.get("/templates/invoice/paid/headers")
    assert "<th>Message-ID</th>" in headers.text
    assert "multipart/alternative" in headers.text
    only_text = preview.get("/templates/notice/default")
    assert only_text.status == 404  # `notice` has no samples, so no `default` either


def test_eml_download_is_the_message_that_would_be_sent(preview: InProcessPreview) -> None:
    download = preview.get("/templates/invoice/paid/eml")
    assert download.status == 200
    assert download.headers["Content-Type"] == "message/rfc822"
    assert download.headers["Content-Disposition"] == 'attachment; filename="invoice-paid.eml"'
    message = email.message_from_bytes(download.raw, policy=email.policy.default)
    assert str(message["Subject"]) == "Invoice A-17 for Grace"
    html_part = message.get_body(("html",))
    assert html_part is not None and 'style="color: #0a7d32' in html_part.get_content()


def test_unknown_paths_are_404_pages(preview: InProcessPreview) -> None:
    for path in (
        "/templates/nope",
        "/templates/invoice/nope",
        "/templates/invoice/paid/nope",
        "/templates/../settings.yaml",
        "/static/nope.js",
        "/outbox",  # only `dispatcher dev` has an Outbox
        "/a/b/c/d/e",
    ):
        page = preview.get(path)
        assert page.status == 404, path
        assert "<h1>Not found</h1>" in page.text


def test_static_assets_are_served_by_the_preview_itself(preview: InProcessPreview) -> None:
    index = preview.get("/").text
    assert "http" not in index.split("<body>")[0]  # nothing loaded from elsewhere
    script, style = preview.get("/static/preview.js"), preview.get("/static/preview.css")
    assert script.status == 200 and "/version" in script.text
    assert style.status == 200 and style.headers["Content-Type"].startswith("text/css")


def test_a_broken_template_shows_file_line_and_source(
    preview: InProcessPreview, tmp_path: Path
) -> None:
    broken = tmp_path / "templates" / "broken"
    broken.mkdir()
    (broken / "subject.txt").write_text("Broken\n")
    (broken / "body.html").write_text("<p>fine</p>\n<p>{{ user.name }</p>\n<p>after</p>\n")
    (broken / "preview.yaml").write_text("default: {user: {name: Ada}}\n")
    page = preview.get("/templates/broken/default")
    assert page.status == 200
    assert "Does not render" in page.text
    assert "templates/broken/body.html:2: unexpected &#39;}&#39;" in page.text
    assert '<span class="here">   2  &lt;p&gt;{{ user.name }&lt;/p&gt;</span>' in page.text
    assert preview.get("/templates/broken/default/html").status == 404
    assert preview.get("/").status == 200  # the other templates are still listed
    assert preview.get("/templates/invoice/paid").status == 200


def test_a_syntax_error_shows_on_the_template_page_even_without_samples(
    preview: InProcessPreview, tmp_path: Path
) -> None:
    broken = tmp_path / "templates" / "unsampled"
    broken.mkdir()
    (broken / "subject.txt").write_text("Hi\n")
    (broken / "body.html").write_text("<p>{% if x %}never closed</p>\n")
    page = preview.get("/templates/unsampled")
    assert page.status == 200
    assert "templates/unsampled/body.html:1: Unexpected end of template" in page.text
    assert "No samples" not in page.text
    assert "Does not render" not in preview.get("/templates/invoice").text  # only its own files


def test_a_broken_preview_yaml_is_shown_with_its_line(
    preview: InProcessPreview, tmp_path: Path
) -> None:
    (tmp_path / "templates" / "invoice" / "preview.yaml").write_text("paid:\n  number: [\n")
    index = preview.get("/")
    assert "templates/invoice/preview.yaml:3: invalid YAML" in index.text
    assert "templates/invoice/preview.yaml:3" in preview.get("/templates/invoice").text
    sample = preview.get("/templates/invoice/paid")  # the YAML error, not a missing variable
    assert "templates/invoice/preview.yaml:3: invalid YAML" in sample.text


def test_an_edited_template_shows_without_a_restart(
    preview: InProcessPreview, tmp_path: Path
) -> None:
    before = preview.get("/version").text
    assert preview.get("/version").text == before  # stable while nothing changes
    assert "Amount due" in preview.get("/templates/invoice/paid/html").text
    body = tmp_path / "templates" / "invoice" / "body.html"
    body.write_text(body.read_text().replace("Amount due", "Total to pay now"))
    assert preview.get("/version").text != before
    assert "Total to pay now: 12.50 EUR" in preview.get("/templates/invoice/paid/html").text
    layout = tmp_path / "templates" / "_layouts" / "plain.html"
    after_body = preview.get("/version").text
    layout.write_text(layout.read_text().replace("<body>", "<body><p>Layout edited</p>"))
    assert preview.get("/version").text != after_body
    assert "Layout edited" in preview.get("/templates/invoice/paid/html").text


def test_ctrl_c_stops_the_preview_with_status_0(start_ui: StartUi) -> None:
    ui = start_ui()
    assert ui.interrupt() == 0
    assert "preview stopped" in ui.log
    assert "Traceback" not in ui.log


def test_startup_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    missing = write_settings(tmp_path, 1025, templates={"dir": "missing"})
    assert_one_line_error(run_cli("preview", "--port", "0", settings=missing), "templates.dir:")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli("preview", "--port", port, settings=ROOT / "settings.yaml")
        assert_one_line_error(result, f"--port {port}: cannot serve the preview")
