"""CSS inlining once per shape of a page: the same bytes as inlining each page whole.

Each case renders a template with a daemon's renderer (shapes on) and with a preview's
(auto-reload: every page inlined whole) and wants the HTML byte for byte the same, for values
chosen to trip the shortcut: markup characters, entities, no-break spaces, CR and NUL, leading
whitespace, class names. Where a shape cannot be sound, the case also checks it was not kept.
"""

from pathlib import Path
from typing import Any

import css_inline
import pytest

from dispatcher import styles
from dispatcher.errors import TemplateError
from dispatcher.render import Renderer

MAIL_FROM = "Example <noreply@example.com>"
CSS = "<style>p { color: #333; } .warn { color: red; } td a { font-weight: bold; }</style>"
# The first is harmless, so that a shape's first mail passes its check: each guard must hold.
TRICKY = [
    "plain",
    'Zoë <O\'Brien> & "Co"',
    "a\xa0b &amp; &copy; &#39;",
    "  padded\n",
    "\nnewline first",
    "line\r\nbreak",
    "nul\x00inside",
    "=;&x",
    ";amp",
    "&lt;b&gt;not bold&lt;/b&gt;",
    "<b>bold?</b>",
    "warn",
    "hidden",
    "https://example.com/?a=1&b=2",
]


def renderers(tmp_path: Path, body: str) -> tuple[Renderer, Renderer]:
    folder = tmp_path / "templates" / "t"
    folder.mkdir(parents=True)
    (folder / "subject.txt").write_text("Hello")
    (folder / "body.html").write_text(body)
    (folder / "body.txt").write_text("text")
    templates = tmp_path / "templates"
    return Renderer(templates, MAIL_FROM), Renderer(templates, MAIL_FROM, auto_reload=True)


def assert_same_pages(
    tmp_path: Path, body: str, contexts: list[dict[str, Any]] | None = None
) -> styles.Inliner:
    """Every context, twice (a new shape, then a kept one), as inlining the page whole gives."""
    shaped, whole = renderers(tmp_path, body)
    contexts = contexts or [{"v": value, "w": other} for value in TRICKY for other in TRICKY[:3]]
    for _ in range(2):
        for context in contexts:
            assert page(shaped, context) == page(whole, context), context
    return shaped._styles


def page(renderer: Renderer, context: dict[str, Any]) -> str | None:
    """The HTML part, or the error (CSS a value broke fails either way)."""
    try:
        return renderer.render_parts("t", context).html
    except TemplateError as exc:
        return f"error: {exc}"


def kept_shapes(inliner: styles.Inliner) -> list[styles.Shape]:
    return [shape for shape in inliner.shapes.values() if shape is not None]


def test_text_and_link_values_fill_a_shape_inlined_once(tmp_path: Path) -> None:
    body = f"""<html lang="{{{{ w }}}}"><head>{CSS}<title>{{{{ v }}}}</title></head><body>
<p class="warn">Hi {{{{ v }}}}!</p><table><tr><td><a href="{{{{ v }}}}">{{{{ w }}}}</a></td></tr>
</table><p>{{{{ 42 }}}} {{{{ 1.5 }}}}</p></body></html>"""
    inliner = assert_same_pages(tmp_path, body)
    assert len(kept_shapes(inliner)) >= 1
    assert inliner.hits["t/body.html"] > inliner.misses["t/body.html"]
    assert not inliner.whole


def test_loops_and_branches_make_one_shape_each(tmp_path: Path) -> None:
    body = f"""<html><head>{CSS}</head><body>{{% for item in items %}}<p>{{{{ item }}}}</p>
{{% endfor %}}{{% if items|length > 2 %}}<p class="warn">many</p>{{% endif %}}</body></html>"""
    contexts = [{"items": TRICKY[:n]} for n in range(5)]
    inliner = assert_same_pages(tmp_path, body, contexts)
    assert len(kept_shapes(inliner)) == 4  # no items: no hole, inlined whole


@pytest.mark.parametrize(
    "body",
    [
        # A class or id from a value: which rules apply depends on it.
        '<p class="{{ v }}">x</p>',
        '<p id="{{ v }}">x</p>',
        '<p style="margin: {{ w }}">x</p>',
        # The parser reads this one: a hidden input stays in the table, others move before it.
        '<table><input type="{{ v }}"><tr><td>x</td></tr></table>',
        # Selectors that read attribute values.
        '<style>a[href^="https"] { color: green; }</style><a href="{{ v }}">x</a>',
        '<style>:lang(de) p { color: green; }</style><div lang="{{ v }}"><p>x</p></div>',
        # Holes the parser reads as more than text.
        "<p title={{ v }}>x</p>",
        "<p>&copy{{ v }}</p>",
        "<!-- {{ v }} --><p>x</p>",
        '<!-- <a title="{{ v }}"> --><p>x</p>',
        "<style>p { content: '{{ v }}'; }</style><p>x</p>",
        "<script>var v = '{{ v }}';</script><p>x</p>",
        "<p {{ v }}>x</p>",
        "<table>{{ v }}<tr><td>x</td></tr></table>",
        "<pre>{{ v }}</pre>",
        "{% autoescape false %}<p>{{ v }}</p>{% endautoescape %}",
        # The template's own text looks like a hole.
        "<p>\ue0000\ue001 {{ v }}</p>",
    ],
)
def test_values_a_selector_or_the_parser_reads_get_the_whole_page_inlined(
    tmp_path: Path, body: str
) -> None:
    assert_same_pages(tmp_path, f"<html><head>{CSS}</head><body>{body}</body></html>")


@pytest.mark.parametrize(
    "code",
    [
        "{% filter upper %}<p>{{ v }}</p>{% endfilter %}",
        "{% set x %}{{ v }}{% endset %}{% if x|length > 6 %}<p>long</p>{% endif %}{{ x }}",
        "{% macro m(a) %}<p>{{ a }}</p>{% endmacro %}{{ m(v)|upper }}",
        "{% for c in [v, w] recursive %}<p>{{ c }}</p>{% endfor %}",
        "{% trans name=v %}<p>Hello {{ name }}</p>{% endtrans %}<p>{{ _('Bye') }} {{ w }}</p>",
    ],
)
def test_code_that_reads_rendered_output_gets_the_whole_page_inlined(
    tmp_path: Path, code: str
) -> None:
    inliner = assert_same_pages(tmp_path, f"<html><head>{CSS}</head><body>{code}</body></html>")
    if "filter" in code or "set x" in code or "macro" in code:
        assert "t/body.html" in inliner.whole


def write_layout(tmp_path: Path, body: str) -> None:
    layouts = tmp_path / "templates" / "_layouts"
    layouts.mkdir(parents=True)
    (layouts / "base.html").write_text(f"<html><head>{CSS}</head><body>{body}</body></html>")


def test_a_layout_that_reads_output_counts_for_its_pages(tmp_path: Path) -> None:
    write_layout(tmp_path, "{% block content %}{% endblock %}<p>{{ self.content()|length }}</p>")
    body = '{% extends "_layouts/base.html" %}{% block content %}<p>{{ v }}</p>{% endblock %}'
    inliner = assert_same_pages(tmp_path, body)
    assert "t/body.html" in inliner.whole


def test_a_block_printed_with_super_keeps_its_shape(tmp_path: Path) -> None:
    write_layout(tmp_path, "{% block content %}<p>{{ w }}</p>{% endblock %}")
    body = '{% extends "_layouts/base.html" %}{% block content %}{{ super() }}<p>{{ v }}</p>'
    inliner = assert_same_pages(tmp_path, body + "{% endblock %}")
    assert kept_shapes(inliner) and not inliner.whole


def test_a_template_with_a_new_shape_per_mail_stops_trying(tmp_path: Path) -> None:
    """Markup values (here unescaped) are part of the shape: every mail is a new one."""
    body = f"<html><head>{CSS}</head><body><p>{{{{ v }}}}</p>{{{{ w|safe }}}}</body></html>"
    contexts = [{"v": "x", "w": f"<i>{n}</i>"} for n in range(styles.TRIAL + 2)]
    inliner = assert_same_pages(tmp_path, body, contexts)
    assert "t/body.html" in inliner.whole
    assert inliner.misses["t/body.html"] == styles.TRIAL


def test_shapes_kept_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page here is longer than the last; the budget holds the first three."""
    head = f"<html><head>{CSS}</head><body>"
    pages = [len(head) + n * len("<p>\ue0000\ue001</p>") + len("</body></html>") for n in (1, 2, 3)]
    monkeypatch.setattr(styles, "SHAPES_BUDGET", sum(pages))
    body = head + "{% for _ in range(n) %}<p>{{ v }}</p>{% endfor %}</body></html>"
    inliner = assert_same_pages(tmp_path, body, [{"n": n, "v": "x"} for n in range(1, 8)])
    assert len(inliner.shapes) == 3
    assert inliner.kept == sum(pages)


@pytest.mark.parametrize("in_attribute", [False, True])
def test_values_are_escaped_as_the_inliner_writes_them(in_attribute: bool) -> None:
    """Every character below U+3000, through css-inline's own parser and serializer."""
    inliner = css_inline.CSSInliner()
    text = "".join(chr(n) for n in range(1, 0x3000) if chr(n) not in "\r\x00")
    page = '<html><head><style>p {{ margin: 0; }}</style></head><body><p title="{}">{}</p>'
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    html = page.format(escaped, "") if in_attribute else page.format("", escaped)
    out = inliner.inline(html + "</body></html>")
    filled = (styles._attribute_text if in_attribute else styles._text)(text)
    assert filled in out


def test_a_page_without_styles_is_left_as_rendered(tmp_path: Path) -> None:
    inliner = assert_same_pages(tmp_path, "<p>{{ v }}</p>")
    assert "t/body.html" in inliner.whole and not inliner.shapes


def test_a_page_of_many_values_keeps_its_shape(tmp_path: Path) -> None:
    body = f"<html><head>{CSS}</head><body>{{% for item in items %}}<p>{{{{ item }}}}</p>"
    contexts = [{"items": [f"{TRICKY[n % 3]} {n}" for n in range(100)]}, {"items": ["x"] * 100}]
    inliner = assert_same_pages(tmp_path, body + "{% endfor %}</body></html>", contexts)
    assert len(kept_shapes(inliner)) == 1
