"""Inline images: `inline()` embeds a template's file once as multipart/related, confined to
the templates folder; a request's own inline attachments; every `cid:` must have its part."""

import base64
import os
from pathlib import Path

import pytest

from dispatcher.errors import InvalidRequest, TemplateError
from dispatcher.preview import PreviewApp
from dispatcher.render import Renderer
from dispatcher.settings import load_settings
from dispatcher.wire import Attachment, request_fields, validate
from tests.content_templates import CONTEXT, LOGO, write_order_templates
from tests.test_render import MAIL_FROM, make_templates, parse, request


def test_an_image_in_the_template_folder_wins_over_the_layouts_one(tmp_path: Path) -> None:
    templates = write_order_templates(tmp_path)
    own = LOGO + b"own"
    (templates / "order" / "logo.png").write_bytes(own)
    parts = Renderer(templates, MAIL_FROM).render_parts("order", CONTEXT)
    assert [a.content for a in parts.inline] == [own]
    assert parts.inline[0].content_type == "image/png"


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", ".hidden.png", "a/../../b"])
def test_names_that_leave_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    templates = make_templates(
        tmp_path, {"t/subject.txt": "Hi", "t/body.html": '<img src="{{ inline(name) }}">'}
    )
    with pytest.raises(TemplateError, match="is not a file name in the template folder") as caught:
        Renderer(templates, MAIL_FROM).render_parts("t", {"name": name})
    assert caught.value.location == "templates/t/body.html:1"


def test_a_link_out_of_the_templates_folder_is_refused(tmp_path: Path) -> None:
    templates = make_templates(
        tmp_path, {"t/subject.txt": "Hi", "t/body.html": "<img src=\"{{ inline('x.png') }}\">"}
    )
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", templates / "t" / "x.png")
    with pytest.raises(TemplateError, match="points outside the templates folder"):
        Renderer(templates, MAIL_FROM).render_parts("t", {})


def test_a_missing_image_names_the_file_and_the_line(tmp_path: Path) -> None:
    templates = make_templates(
        tmp_path, {"t/subject.txt": "Hi", "t/body.html": "\n<img src=\"{{ inline('no.png') }}\">"}
    )
    with pytest.raises(TemplateError, match=r"inline: no file 'no.png' in t/ or _layouts/") as c:
        Renderer(templates, MAIL_FROM).render_parts("t", {})
    assert c.value.location == "templates/t/body.html:2"


def test_a_request_carries_its_own_inline_image(tmp_path: Path) -> None:
    templates = make_templates(
        tmp_path, {"hello/subject.txt": "Hi", "hello/body.html": '<img src="cid:chart">'}
    )
    fields = request_fields(
        "hello",
        {
            "to": "ada@example.com",
            "attachments": [
                Attachment("chart.png", "image/png", LOGO, content_id="chart"),
                ("report.csv", b"a,b\n"),
            ],
        },
    )
    assert fields["attachments"][0]["content_id"] == "chart"
    message = parse(Renderer(templates, MAIL_FROM).render(validate(fields)).data)
    assert message.get_content_type() == "multipart/mixed"
    related = next(p for p in message.walk() if p.get_content_type() == "multipart/related")
    image = [p for p in related.iter_parts() if p["Content-ID"] == "<chart>"]
    assert image and image[0].get_content() == LOGO
    assert image[0].get_content_disposition() == "inline"
    files = [p.get_filename() for p in message.iter_attachments()]
    assert "report.csv" in files


def test_a_cid_without_its_image_is_refused(tmp_path: Path) -> None:
    html = '<img src="cid:chart"><img src="cid:nothing">'
    templates = make_templates(tmp_path, {"hello/subject.txt": "Hi", "hello/body.html": html})
    chart = Attachment("chart.png", "image/png", LOGO, content_id="chart")
    with pytest.raises(TemplateError, match="no inline image for cid:nothing"):
        Renderer(templates, MAIL_FROM).render(request(attachments=(chart,)))


def test_a_bad_content_id_is_refused_at_once() -> None:
    data = base64.b64encode(LOGO).decode()
    with pytest.raises(InvalidRequest, match=r"attachments\[0\]\.content_id"):
        validate(
            {"v": 1, "template": "t", "to": "a@example.com",
             "attachments": [{"filename": "a.png", "data": data, "content_id": "<x>\r\n"}]}
        )  # fmt: skip


def test_without_html_inline_images_go_as_files(tmp_path: Path) -> None:
    templates = make_templates(tmp_path, {"hello/subject.txt": "Hi", "hello/body.txt": "Text"})
    attachment = Attachment("chart.png", "image/png", LOGO, content_id="chart")
    message = parse(Renderer(templates, MAIL_FROM).render(request(attachments=(attachment,))).data)
    assert message.get_content_type() == "multipart/mixed"


def test_the_preview_shows_inline_images_as_data_urls(tmp_path: Path) -> None:
    write_order_templates(tmp_path)
    app = PreviewApp(load_settings(None, {"templates": {"dir": str(tmp_path / "templates")}}))
    html = app.handle("/templates/order/default/html").body.decode()
    assert "cid:" not in html
    assert f'src="data:image/png;base64,{base64.b64encode(LOGO).decode()}"' in html
