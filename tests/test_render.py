"""Rendering: Jinja templates to parts, parts to an RFC 5322 message, errors to `file:line`.

Ad-hoc templates live in `tmp_path/templates`, so error locations read `templates/<name>/<file>`
exactly as they do for the shipped templates. Built messages are parsed back with the stdlib, as a
mail client would, rather than compared as strings.
"""

import email
import email.policy
import http.server
import pickle
import threading
from datetime import UTC, datetime
from email.message import EmailMessage, MIMEPart
from pathlib import Path
from typing import Any

import pytest

from dispatcher.address import Address, parse_address
from dispatcher.compose import check_headers
from dispatcher.errors import TemplateError
from dispatcher.render import Renderer, html_to_text
from dispatcher.wire import Attachment, Request

SHIPPED = Path(__file__).parents[1] / "templates"
MAIL_FROM = "Example <noreply@example.com>"
NOW = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
LAYOUT = """<html><head><style>p { color: #333; }</style></head><body>
<div class="card">{% block content %}{% endblock %}</div>
<footer>{% block footer %}Sent by {{ product | default("Example") }}{% endblock %}</footer>
</body></html>
"""


def make_templates(root: Path, files: dict[str, str]) -> Path:
    """Write `{"name/file": text}` under root/templates and return that folder."""
    templates = root / "templates"
    for relative, text in files.items():
        path = templates / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return templates


def renderer_for(tmp_path: Path, files: dict[str, str]) -> Renderer:
    return Renderer(make_templates(tmp_path, files), MAIL_FROM)


def request(template: str = "hello", **fields: Any) -> Request:
    fields.setdefault("to", (parse_address("Ada Lovelace <ada@example.com>", "to"),))
    fields.setdefault("context", {"name": "Ada"})
    return Request(id=fields.pop("id", "req-1"), template=template, **fields)


def parse(data: bytes) -> EmailMessage:
    """The message as a mail client reads it; the parser found nothing wrong in any part."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    for part in message.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    return message


def content(part: MIMEPart | None) -> str:
    """A text part's decoded content; the wire form has CRLF line ends, which the parser keeps."""
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


@pytest.fixture
def hello(tmp_path: Path) -> Renderer:
    """A template with subject, HTML through the layout, and no body.txt."""
    return renderer_for(
        tmp_path,
        {
            "_layouts/base.html": LAYOUT,
            "hello/subject.txt": "Hello {{ name }}\n & welcome\n",
            "hello/body.html": (
                '{% extends "_layouts/base.html" %}\n'
                "{% block content %}<p>Hi {{ name }}!</p>"
                '<p><a href="{{ url | default("https://example.com/go") }}">Get started</a></p>'
                "{% endblock %}\n"
            ),
        },
    )


def test_html_body_is_autoescaped_but_subject_and_text_are_not(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "t/subject.txt": "Hi {{ name }}",
            "t/body.html": "<p>{{ name }}</p>",
            "t/body.txt": "Hi {{ name }}",
        },
    )
    parts = renderer.render_parts("t", {"name": "<script>x</script> & Co"})
    assert parts.html == "<p>&lt;script&gt;x&lt;/script&gt; &amp; Co</p>"
    assert parts.subject == "Hi <script>x</script> & Co"
    assert parts.text == "Hi <script>x</script> & Co"


def test_subject_is_collapsed_to_one_line(hello: Renderer) -> None:
    assert hello.render_parts("hello", {"name": "Ada"}).subject == "Hello Ada & welcome"


def test_empty_subject_is_an_error(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, {"t/subject.txt": "  {{ x }}\n", "t/body.txt": "x"})
    with pytest.raises(TemplateError, match="subject is empty") as caught:
        renderer.render_parts("t", {"x": ""})
    assert caught.value.location == "templates/t/subject.txt"


def test_subject_with_encoded_word_from_context_is_refused(tmp_path: Path) -> None:
    """CVE-2024-6923: `=?` in a subject could become a header line on Python 3.11.7."""
    renderer = renderer_for(tmp_path, {"t/subject.txt": "Hi {{ x }}", "t/body.txt": "x"})
    with pytest.raises(TemplateError, match="encoded words"):
        renderer.render_parts("t", {"x": "=?UTF-8?Q?=0A?=Bcc: evil@example.com"})


def test_undefined_variable_names_file_and_line(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {"t/subject.txt": "Hi", "t/body.html": "<p>one</p>\n<p>two</p>\n<p>{{ name }}</p>\n"},
    )
    with pytest.raises(TemplateError) as caught:
        renderer.render_parts("t", {})
    assert caught.value.location == "templates/t/body.html:3"
    assert str(caught.value) == "templates/t/body.html:3: 'name' is undefined"


def test_undefined_variable_in_layout_points_at_the_layout(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "_layouts/base.html": "<html>\n{% block content %}{% endblock %}\n{{ missing }}\n",
            "t/subject.txt": "Hi",
            "t/body.html": '{% extends "_layouts/base.html" %}{% block content %}x{% endblock %}',
        },
    )
    with pytest.raises(TemplateError, match="'missing' is undefined") as caught:
        renderer.render_parts("t", {})
    assert caught.value.location == "templates/_layouts/base.html:3"


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path, {"t/subject.txt": "Hi", "t/body.txt": "line one\n{% if x %}\nno endif\n"}
    )
    with pytest.raises(TemplateError) as caught:
        renderer.render_parts("t", {"x": 1})
    assert caught.value.location is not None
    assert caught.value.location.startswith("templates/t/body.txt:")
    assert "endif" in str(caught.value)


def test_exception_inside_rendering_becomes_template_error(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, {"t/subject.txt": "Hi", "t/body.txt": "\n{{ 1 // n }}"})
    with pytest.raises(TemplateError, match="ZeroDivisionError") as caught:
        renderer.render_parts("t", {"n": 0})
    assert caught.value.location == "templates/t/body.txt:2"


def test_missing_subject_and_unknown_template_are_template_errors(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, {"t/body.txt": "x"})
    with pytest.raises(TemplateError, match=r"subject\.txt"):
        renderer.render_parts("t", {})
    with pytest.raises(TemplateError, match="unknown template 'nope'"):
        renderer.render_parts("nope", {})
    with pytest.raises(TemplateError, match="unknown template"):
        renderer.render_parts("../t", {})


def test_layout_inheritance_shows_up_in_html(hello: Renderer) -> None:
    html = hello.render_parts("hello", {"name": "Ada", "product": "Acme"}).html
    assert html is not None
    assert '<div class="card"><p style="color: #333;">Hi Ada!</p>' in html  # CSS inlined
    assert "<footer>Sent by Acme</footer>" in html


def test_text_part_is_derived_from_html_with_readable_links(hello: Renderer) -> None:
    text = hello.render_parts("hello", {"name": "Ada"}).text
    assert "Hi Ada!" in text
    assert "Get started (https://example.com/go)" in text
    assert "[Get started]" not in text
    assert "p { color" not in text  # the <style> block is not text


def test_html_to_text_link_forms() -> None:
    html = (
        '<p><a href="https://x.example/a">https://x.example/a</a> '
        '<a href="mailto:help@example.com">help@example.com</a> '
        '<a href="mailto:help@example.com">Write to us</a> '
        '<a href="#top">Top</a> <a href="https://x.example/i"><img src="i.png" alt=""></a></p>'
    )
    assert html_to_text(html) == (
        "https://x.example/a help@example.com Write to us (help@example.com) Top "
        "https://x.example/i\n"
    )


def test_message_is_multipart_alternative_and_round_trips_non_ascii(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "t/subject.txt": "Bienvenue {{ name }} ☃",
            "t/body.html": "<p>Grüße, {{ name }}!</p>",
            "t/body.txt": "Grüße, {{ name }}!",
        },
    )
    to = (Address("Zoë O'Brien, Co", "zoe@example.com"),)
    rendered = renderer.render(request("t", to=to, context={"name": "Zoë"}), NOW)
    assert b"\r\n" in rendered.data and b"\n" not in rendered.data.replace(b"\r\n", b"")
    assert rendered.data.isascii()  # 7-bit clean: no 8BITMIME needed
    message = parse(rendered.data)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["Subject"] == "Bienvenue Zoë ☃" == rendered.subject
    assert message["To"].addresses[0].display_name == "Zoë O'Brien, Co"
    assert content(message.get_body(("plain",))) == "Grüße, Zoë!\n"
    assert content(message.get_body(("html",))) == "<p>Grüße, Zoë!</p>\n"
    assert message["From"].addresses[0].addr_spec == "noreply@example.com"
    assert message["Date"].datetime == NOW
    assert message["MIME-Version"] == "1.0"


def test_text_only_template_is_text_plain(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, {"t/subject.txt": "Hi", "t/body.txt": "Just text"})
    message = parse(renderer.render(request("t"), NOW).data)
    assert message.get_content_type() == "text/plain"
    assert content(message) == "Just text\n"


def test_bcc_is_in_the_envelope_but_not_in_the_headers(hello: Renderer) -> None:
    addr = parse_address
    req = request(
        to=(addr("ada@example.com", "to"), addr("bob@example.com", "to")),
        cc=(addr("Carol <carol@example.com>", "cc"), addr("ada@example.com", "cc")),
        bcc=(addr("dave@example.com", "bcc"),),
        reply_to=(addr("Support <help@example.com>", "reply_to"),),
    )
    rendered = hello.render(req, NOW)
    assert rendered.recipients == (
        "ada@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    )
    assert b"dave@" not in rendered.data
    message = parse(rendered.data)
    assert "Bcc" not in message
    assert str(message["Cc"]) == "Carol <carol@example.com>, ada@example.com"
    assert str(message["Reply-To"]) == "Support <help@example.com>"
    assert rendered.envelope_from == "noreply@example.com"


def test_no_cc_or_reply_to_header_when_empty(hello: Renderer) -> None:
    message = parse(hello.render(request(), NOW).data)
    assert "Cc" not in message and "Reply-To" not in message


def test_message_id_uses_sender_domain_and_is_stable(hello: Renderer) -> None:
    first = hello.render(request(id="abc123"), NOW)
    again = hello.render(request(id="abc123"), NOW)
    assert first.message_id == "<abc123@example.com>"
    assert first.data == again.data
    assert parse(first.data)["Message-ID"] == "<abc123@example.com>"
    later = hello.render(request(id="abc123"), datetime(2030, 1, 1, tzinfo=UTC))
    assert later.message_id == first.message_id

    sender = parse_address("Shop <orders@shop.example.org>", "sender")
    from_sender = hello.render(request(id="abc123", sender=sender), NOW)
    assert from_sender.message_id == "<abc123@shop.example.org>"
    assert from_sender.envelope_from == "orders@shop.example.org"
    assert str(parse(from_sender.data)["From"]) == "Shop <orders@shop.example.org>"


def test_message_id_escapes_colon_in_request_id(hello: Renderer) -> None:
    """':' is valid in a request id but not in a msg-id; Python would cut the header short."""
    rendered = hello.render(request(id="app:42"), NOW)
    assert rendered.message_id == "<app=3A42@example.com>"
    assert parse(rendered.data)["Message-ID"] == rendered.message_id


def test_international_domain_is_written_in_punycode(hello: Renderer) -> None:
    to = (parse_address("Zoë <zoe@exämple.com>", "to"),)
    rendered = hello.render(request(to=to), NOW)
    assert rendered.recipients == ("zoe@xn--exmple-cua.com",)
    assert parse(rendered.data)["To"].addresses[0].addr_spec == "zoe@xn--exmple-cua.com"


def test_custom_headers_are_present(hello: Renderer) -> None:
    headers = {"List-Unsubscribe": "<https://example.com/u/1>", "X-Campaign": "spring"}
    message = parse(hello.render(request(headers=headers), NOW).data)
    assert message["List-Unsubscribe"] == "<https://example.com/u/1>"
    assert message["X-Campaign"] == "spring"


def test_attachment_makes_multipart_mixed(hello: Renderer) -> None:
    attachment = Attachment("report é.csv", "text/csv", b"a,b\r\n1,2\r\n")
    message = parse(hello.render(request(attachments=(attachment,)), NOW).data)
    assert message.get_content_type() == "multipart/mixed"
    body, attached = list(message.iter_parts())
    assert body.get_content_type() == "multipart/alternative"
    assert "MIME-Version" not in body
    assert attached.get_filename() == "report é.csv"
    assert attached.get_content_type() == "text/csv"
    assert attached.get_payload(decode=True) == b"a,b\r\n1,2\r\n"


def test_header_injection_through_custom_header_is_caught(hello: Renderer) -> None:
    """Intake refuses `=?` in header values; render checks the built header block regardless."""
    headers = {"X-Note": "A \u2603 note=?UTF-8?Q?=0A?=Bcc: injected@example.com"}
    try:
        rendered = hello.render(request(headers=headers), NOW)
    except TemplateError as exc:
        assert "header check failed" in str(exc)
    else:  # a Python with the CVE-2024-6923 fix encodes the newline instead
        assert "Bcc" not in parse(rendered.data)


def test_template_names_and_has_template(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "_layouts/base.html": LAYOUT,
            ".hidden/body.txt": "x",
            "b/subject.txt": "B",
            "b/body.txt": "b",
            "a/subject.txt": "A",
            "a/body.html": "<p>a</p>",
            "empty/subject.txt": "no body",
        },
    )
    assert renderer.template_names() == ["a", "b"]
    assert renderer.has_template("a")
    assert not renderer.has_template("empty")
    assert not renderer.has_template("_layouts")
    assert not renderer.has_template("../a")
    make_templates(tmp_path, {"c/body.txt": "c"})
    assert renderer.has_template("c")  # a miss re-scans the folder


def test_samples_reads_preview_yaml(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "t/body.txt": "x",
            "t/preview.yaml": "default:\n  name: Ada\nother:\n  name: Bob\n  n: 3\n",
            "bare/body.txt": "x",
        },
    )
    assert renderer.samples("t") == {"default": {"name": "Ada"}, "other": {"name": "Bob", "n": 3}}
    assert renderer.samples("bare") == {}


@pytest.mark.parametrize("text", ["- a\n- b\n", "default: Ada\n", "a: [\n"])
def test_malformed_samples_are_template_errors(tmp_path: Path, text: str) -> None:
    renderer = renderer_for(tmp_path, {"t/body.txt": "x", "t/preview.yaml": text})
    with pytest.raises(TemplateError) as caught:
        renderer.samples("t")
    assert caught.value.location is not None
    assert caught.value.location.startswith("templates/t/preview.yaml")


def test_shipped_templates_render_every_sample() -> None:
    renderer = Renderer(SHIPPED, MAIL_FROM)
    names = renderer.template_names()
    assert {"welcome", "password_reset"} <= set(names)
    for name in names:
        samples = renderer.samples(name)
        assert {"default", "long_name"} <= set(samples), name
        for sample, context in samples.items():
            parts = renderer.render_parts(name, context)
            assert parts.subject and "\n" not in parts.subject, (name, sample)
            assert parts.html is not None and parts.text.strip(), (name, sample)
            message = parse(renderer.render(request(name, context=context), NOW).data)
            assert message["Subject"] == parts.subject


def test_shipped_templates_escape_html_and_derive_text() -> None:
    renderer = Renderer(SHIPPED, MAIL_FROM)
    context = renderer.samples("password_reset")["long_name"]
    parts = renderer.render_parts("password_reset", context)
    assert parts.html is not None
    assert "Zoë &lt;O'Brien&gt; &amp; Co" in parts.html  # the CSS inliner re-serialises
    assert "Zoë <O'Brien> & Co" in parts.text
    assert f"Choose a new password ({context['reset_url']})" in parts.text
    assert f"{context['expires_in_minutes']} minutes" in parts.text

    welcome = renderer.render_parts("welcome", renderer.samples("welcome")["default"])
    assert welcome.subject == "Welcome to Example, Ada!"
    assert "https://example.com/activate" in welcome.text


def test_style_block_is_inlined_and_media_queries_kept(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "t/subject.txt": "Hi",
            "t/body.html": "<html><head><style>.x { color: #123456; } p { margin: 0; }"
            " @media (max-width: 600px) { .x { color: red; } }</style></head>"
            '<body><p class="x" style="font-weight: bold">{{ name }}</p></body></html>',
        },
    )
    html = renderer.render_parts("t", {"name": "Ada"}).html
    assert html is not None
    # by specificity, and the element's own style attribute wins over both
    assert '<p class="x" style="margin: 0;color: #123456;font-weight: bold">Ada</p>' in html
    assert "<style>@media (max-width: 600px)" in html  # cannot be inlined: kept for clients
    assert ".x { color: #123456; }" not in html


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012  (one list per test: the test replaces it)

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"p { color: red; }")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_inlining_never_fetches_a_stylesheet(tmp_path: Path) -> None:
    """A <link> or @import pointing at a live server on loopback is never requested."""
    _CountingHandler.requests = []
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        renderer = renderer_for(
            tmp_path,
            {
                "t/subject.txt": "Hi",
                "t/body.html": f'<html><head><link rel="stylesheet" href="{url}/link.css">'
                f"<style>@import url({url}/import.css); p {{ margin: 0; }}</style></head>"
                "<body><p>Ada</p></body></html>",
            },
        )
        html = renderer.render_parts("t", {}).html
        server.shutdown()
    assert html is not None and '<p style="margin: 0;">Ada</p>' in html
    assert "link.css" not in html  # the <link> is dropped, not loaded
    assert _CountingHandler.requests == []


def test_html_without_a_style_block_is_left_as_written(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, {"t/subject.txt": "Hi", "t/body.html": "<p>{{ name }}</p>"})
    assert renderer.render_parts("t", {"name": "Ada"}).html == "<p>Ada</p>"


def test_reloading_renderer_sees_a_body_file_appear_and_go(tmp_path: Path) -> None:
    """Preview (auto_reload=True) looks the body files up on every render."""
    templates = make_templates(tmp_path, {"t/subject.txt": "Hi", "t/body.txt": "Text"})
    renderer = Renderer(templates, MAIL_FROM, auto_reload=True)
    assert parse(renderer.render(request("t"), NOW).data).get_content_type() == "text/plain"
    (templates / "t" / "body.html").write_text("<p>HTML</p>", encoding="utf-8")
    message = parse(renderer.render(request("t"), NOW).data)
    assert message.get_content_type() == "multipart/alternative"
    assert content(message.get_body(("html",))) == "<p>HTML</p>\n"
    (templates / "t" / "body.html").unlink()
    assert parse(renderer.render(request("t"), NOW).data).get_content_type() == "text/plain"


def test_what_the_builder_cannot_write_is_a_template_error(hello: Renderer) -> None:
    """wire accepts any \\w in a MIME type; a header can carry only ASCII tokens."""
    attachment = Attachment("a.csv", "téxt/csv", b"x")
    with pytest.raises(TemplateError, match="cannot build the message: not a valid MIME type"):
        hello.render(request(attachments=(attachment,)), NOW)


def test_header_check_finds_a_header_line_made_by_a_bare_line_break(hello: Renderer) -> None:
    rendered = hello.render(request(), NOW)
    written = list(parse(rendered.data).keys())
    check_headers(written, rendered.data, rendered.message_id)  # what we wrote passes
    for forged in (b"\nBcc: evil@example.com", b"\rBcc: evil@example.com"):
        data = rendered.data.replace(b"\r\nDate:", forged + b"\r\nDate:", 1)
        with pytest.raises(TemplateError, match=r"unexpected \['bcc'\]"):
            check_headers(written, data, rendered.message_id)
    data = rendered.data.replace(b"\r\nDate:", b"\r\n\nDate:", 1)  # ends the header block early
    with pytest.raises(TemplateError, match="missing"):
        check_headers(written, data, rendered.message_id)
    data = rendered.data.replace(rendered.message_id.encode(), b"<other@example.com>")
    with pytest.raises(TemplateError, match="Message-ID came out as"):
        check_headers(written, data, rendered.message_id)


def test_a_rendered_message_crosses_from_a_render_worker_unchanged() -> None:
    """Workers hand messages back pickled: every field must survive the trip."""
    ada = {"name": "Ada", "activate_url": "https://example.com/a"}
    message = Renderer(SHIPPED, MAIL_FROM).render(request("welcome", context=ada), NOW)
    assert pickle.loads(pickle.dumps(message)) == message
