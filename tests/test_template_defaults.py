"""template.yaml: a template's defaults for sender, Reply-To, headers, tags, locale and the
unsubscribe URL; a request's own values win; mistakes name the file and the key."""

from pathlib import Path

import pytest

from dispatcher.address import parse_address
from dispatcher.errors import TemplateError
from dispatcher.render import Renderer, check_templates
from tests.test_render import MAIL_FROM, make_templates, parse, request

DEFAULTS = """\
from: "Billing <billing@example.com>"
reply_to: help@example.com
headers: {X-Campaign: spring, X-Team: billing}
tags: [billing]
unsubscribe_url: https://example.com/u/1
"""


def renderer_with(tmp_path: Path, defaults: str) -> Renderer:
    return Renderer(
        make_templates(
            tmp_path,
            {"hello/subject.txt": "Hi", "hello/body.txt": "Hello", "hello/template.yaml": defaults},
        ),
        MAIL_FROM,
    )


def test_defaults_fill_what_the_request_leaves_out(tmp_path: Path) -> None:
    message = parse(renderer_with(tmp_path, DEFAULTS).render(request()).data)
    assert message["From"] == "Billing <billing@example.com>"
    assert message["Reply-To"] == "help@example.com"
    assert message["X-Campaign"] == "spring"
    assert message["List-Unsubscribe"] == "<https://example.com/u/1>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_the_request_wins(tmp_path: Path) -> None:
    renderer = renderer_with(tmp_path, DEFAULTS)
    own = request(
        sender=parse_address("Ada <ada@example.com>", "sender"),
        headers={"x-campaign": "autumn", "List-Unsubscribe": "<mailto:u@example.com>"},
        tags=("vip",),
    )
    message = parse(renderer.render(own).data)
    assert message["From"] == "Ada <ada@example.com>"
    assert message.get_all("X-Campaign") == ["autumn"] and message["X-Team"] == "billing"
    assert message["List-Unsubscribe"] == "<mailto:u@example.com>"  # its own, not the default
    assert message["List-Unsubscribe-Post"] is None
    assert renderer.defaults("hello").apply(own).tags == ("billing", "vip")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("form: a@example.com\n", "form: unknown key (known: from, reply_to, headers, tags,"),
        ("from: not an address\n", "from: "),
        ("headers: {Subject: x}\n", "headers: Subject is set by the dispatcher"),
        ("tags: [a b]\n", "tags[0]: 'a b' is not a tag"),
        ("unsubscribe_url: http://example.com/u\n", "unsubscribe_url: expected an https:// URL"),
        ("locale: 12\n", "locale: 12 is not a locale"),
        ("[1, 2]\n", "expected a mapping of from, reply_to"),
        ("from: [\n", "invalid YAML"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, error: str) -> None:
    renderer = renderer_with(tmp_path, text)
    with pytest.raises(TemplateError) as caught:
        renderer.render(request())
    assert str(caught.value).startswith("templates/hello/template.yaml")
    assert error in str(caught.value)
    failures = check_templates(renderer).failures
    assert len(failures) == 1 and error in failures[0]
