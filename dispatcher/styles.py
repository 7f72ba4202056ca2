"""CSS inlining: `<style>` rules copied into `style` attributes, once per shape of a page.

Mail clients drop `<style>` blocks (Gmail clips them, Outlook ignores many rules), so every rule
that can be is inlined. At-rules (@media) cannot be, so they stay in a `<style>` block for the
clients that honour them. Nothing is ever fetched: `<link>` stylesheets are dropped, not loaded.

Inlining parses and rewrites the whole page, the largest cost of a render. Mails of one template
mostly differ only in the text their values fill in, so `Inliner` inlines each *shape* of a page
once: the page rendered with every plain text value replaced by a numbered hole, inlined, and
cut at the holes. Later mails of that shape fill the holes with their values, escaped as the
inliner writes them. A shape is kept only where filling it cannot differ from inlining the page
(holes in text, or in attributes no selector of the page reads), and only once its first mail
came out byte for byte as inlining that mail's page does; anything else is inlined whole.
"""

import contextvars
import re
from collections.abc import Callable
from typing import Any

import css_inline
import jinja2
from jinja2 import nodes
from markupsafe import Markup, escape

from dispatcher.errors import TemplateError

_STYLE_TAG = re.compile(r"<style\b", re.IGNORECASE)
_CSS_INLINER = css_inline.CSSInliner(
    load_remote_stylesheets=False, keep_link_tags=False, keep_at_rules=True
)

# Characters of pages a renderer keeps with their shapes (each about twice over: the page and its
# cut); past it, new shapes are inlined whole. Bounds a worker's memory whatever the pages.
SHAPES_BUDGET = 4 * 1024 * 1024
TRIAL = 32  # shapes a template may miss before it must hit as often as it misses

_SPACE = " \t\n\r\f"  # HTML's whitespace: a value's leading and trailing runs stay in the shape
_HOLE = re.compile("\ue000(\\d+)\ue001")  # private-use characters around a value's number
# Values the parser would change on the way in (CR to LF, NUL dropped), or cannot take at all.
_UNFILLABLE = re.compile("[\x00\r\ud800-\udfff]")
# A hole right after `&name`: the value could complete or end a character reference.
_AFTER_REFERENCE = re.compile("&[#0-9A-Za-z]*\ue000")
# A tag as the template wrote it, and its quoted values: a hole in a tag must be in one (a
# space would end an unquoted value, and a name is no value).
_SOURCE_TAG = re.compile(r"<[A-Za-z][^>\"']*(?:(?:\"[^\"]*\"|'[^']*')[^>\"']*)*>")
_SOURCE_QUOTED = re.compile(r"=[ \t\n\f]*(?:\"[^\"]*\"|'[^']*')")
_STYLE_BLOCK = re.compile(r"<style\b[^>]*>(.*?)</style", re.IGNORECASE | re.DOTALL)
# Selectors that read attribute values: `[href^=...]`, `:lang()`, `:dir()` and the form states.
_READS_ATTRIBUTES = re.compile(
    r"\[|:(?:lang|dir|checked|disabled|enabled|default|indeterminate|placeholder-shown|"
    r"read-only|read-write|required|optional|valid|invalid|in-range|out-of-range|target)\b",
    re.IGNORECASE,
)
_RULE_PRELUDE = re.compile(r"([^{};]*)\{")
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
# The inliner's output, as its serializer writes it: attribute values always in double quotes.
_PIECE = re.compile(r'<!--.*?-->|<[^>"]*(?:"[^"]*"[^>"]*)*>|[^<]+|<', re.DOTALL)
_QUOTED_VALUE = re.compile(r'([^\s"\'>/=]+)="([^"]*)"')
_RAW_TEXT = ("style", "script", "xmp", "iframe", "noembed", "noframes", "noscript", "plaintext")
# Attributes whose values decide more than themselves: what selectors match, and how the parser
# builds the tree (`<input type=hidden>` stays in a table, `<annotation-xml encoding>`).
_DECIDING_ATTRIBUTES = frozenset(("class", "id", "style", "type", "encoding"))
_PLAIN_VALUES = (str, int, float)


def inline_css(html: str, where: str | None = None) -> str:
    """The HTML part as mail clients want it: `<style>` rules moved into `style` attributes.

    HTML without a `<style>` block is returned as written: the inliner would re-serialise it
    (wrapping a fragment in `<html><body>`) for nothing.
    """
    if not _STYLE_TAG.search(html):
        return html
    try:
        return _CSS_INLINER.inline(html)
    except ValueError as exc:  # css-inline raises ValueError for CSS it cannot parse
        raise TemplateError(f"cannot inline the CSS: {exc}", where) from exc


class _Holes:
    """What a render in shape mode collected: its values, and the template files it used."""

    __slots__ = ("templates", "values")

    def __init__(self) -> None:
        self.values: list[str] = []
        self.templates: set[str] = set()


_current: contextvars.ContextVar[_Holes | None] = contextvars.ContextVar(
    "dispatcher_styles_holes", default=None
)


@jinja2.pass_eval_context
def hollow(eval_ctx: jinja2.nodes.EvalContext, value: Any) -> Any:
    """The environment's `finalize`: in a render `Inliner` shapes, a plain text value printed
    escaped becomes a numbered hole; everywhere else every value is printed as it is."""
    holes = _current.get()
    if holes is None or value.__class__ not in _PLAIN_VALUES or not eval_ctx.autoescape:
        return value
    text = str(value)
    core = text.strip(_SPACE)
    if not core:
        return value
    number = len(holes.values)
    holes.values.append(core)
    if len(core) == len(text):
        return _mark(number)
    lead = text[: len(text) - len(text.lstrip(_SPACE))]
    return Markup(f"{lead}\ue000{number}\ue001{text[len(lead) + len(core) :]}")


_MARKS = [Markup(f"\ue000{number}\ue001") for number in range(64)]  # the common holes' marks


def _mark(number: int) -> Markup:
    return _MARKS[number] if number < len(_MARKS) else Markup(f"\ue000{number}\ue001")


def note_template(name: str) -> None:
    """Called by the environment for every file a template extends, includes or imports."""
    holes = _current.get()
    if holes is not None:
        holes.templates.add(name)


class Shape:
    """An inlined page cut at its holes: `literals` around `holes` (number, in an attribute)."""

    def __init__(self, literals: list[str], holes: list[tuple[int, bool]]) -> None:
        self.literals = literals
        self.holes = holes

    def fill(self, values: list[str]) -> str:
        out = [self.literals[0]]
        for (number, in_attribute), literal in zip(self.holes, self.literals[1:], strict=True):
            value = values[number]
            out.append(_attribute_text(value) if in_attribute else _text(value))
            out.append(literal)
        return "".join(out)


class Inliner:
    """Inlines the CSS of a renderer's pages, each shape once (see the module docstring)."""

    def __init__(self, env: jinja2.Environment, *, keep_shapes: bool) -> None:
        self.env = env
        self.keep_shapes = keep_shapes  # off where templates change under us (auto-reload)
        self.shapes: dict[str, Shape | None] = {}  # page with holes -> its shape; None: whole
        self.kept = 0  # characters of the pages in `shapes`
        self.whole: set[str] = set()  # templates whose pages are always inlined whole
        self.misses: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.reads_output: dict[str, bool] = {}  # template file -> may its code read output

    def page(self, template: str, render: Callable[[], str], where: str) -> str:
        """`render()`'s page (the HTML file `template`), its CSS inlined."""
        if not self.keep_shapes or template in self.whole:
            return inline_css(render(), where)
        holes = _Holes()
        token = _current.set(holes)
        try:
            page = render()
        finally:
            _current.reset(token)
        values = holes.values
        if any(self._reads_output(name) for name in (template, *holes.templates)):
            self.whole.add(template)  # its code saw holes where the values belong
            return inline_css(render(), where)
        if page in self.shapes:  # passed the checks below when it was learned
            shape = self.shapes[page]
            self.hits[template] = self.hits.get(template, 0) + 1
            if shape is not None and _fillable(values):
                return shape.fill(values)
            return inline_css(_filled(page, values), where)
        if (
            not _STYLE_TAG.search(page)  # nothing to inline: not worth the holes next time
            or not _numbered(page, len(values))  # the template's own text holds a hole's marks
        ):
            self.whole.add(template)
            return inline_css(render(), where)
        if not values:
            return inline_css(page, where)
        return self._learn(template, page, values, where)

    def _learn(self, template: str, page: str, values: list[str], where: str) -> str:
        """Inline a new shape's first mail whole, and keep the shape if it gives the same."""
        inlined = inline_css(_filled(page, values), where)
        misses = self.misses[template] = self.misses.get(template, 0) + 1
        if misses >= TRIAL and misses > self.hits.get(template, 0):
            self.whole.add(template)  # its pages take too many shapes to pay off
        elif self.kept + len(page) <= SHAPES_BUDGET and _fillable(values):
            shape = cut(page, inline_css(page, where), len(values))
            self.shapes[page] = shape if shape and shape.fill(values) == inlined else None
            self.kept += len(page)
        return inlined

    def _reads_output(self, name: str) -> bool:
        if name not in self.reads_output:
            try:
                source = self.env.loader.get_source(self.env, name)[0]  # type: ignore[union-attr]
                self.reads_output[name] = reads_output(self.env.parse(source))
            except jinja2.TemplateNotFound:  # looked for (an include's fallback), never used
                self.reads_output[name] = False
            except Exception:  # it rendered, so this is unexpected: be safe
                self.reads_output[name] = True
        return self.reads_output[name]


def cut(page: str, inlined: str, count: int) -> Shape | None:
    """`inlined` (`page` inlined) cut at its `count` holes; None where a hole is not plain text
    or an attribute value no selector of the page reads."""
    if _AFTER_REFERENCE.search(page) or not _holes_quoted(page):
        return None
    css = "".join(_STYLE_BLOCK.findall(page))
    selectors = "".join(
        prelude
        for prelude in _RULE_PRELUDE.findall(_CSS_COMMENT.sub("", css))
        if not prelude.lstrip().startswith("@")
    )
    attributes_read = bool(_READS_ATTRIBUTES.search(selectors))
    in_attribute: dict[int, bool] = {}
    raw_until = None  # inside a raw-text element: the end tag that closes it
    for piece in _PIECE.finditer(inlined):
        text = piece[0]
        if raw_until is not None:
            if not text.lower().startswith(raw_until):
                continue  # <style>, <script>: text the parser does not decode
            raw_until = None
        if not text.startswith("<"):
            in_attribute.update((int(number), False) for number in _HOLE.findall(text))
        elif not text.startswith("<!--"):
            if (name := _tag_name(text)) in _RAW_TEXT:
                raw_until = f"</{name}"
            for attribute, value in _QUOTED_VALUE.findall(text):
                if "\ue000" in value:
                    if attributes_read or attribute.lower() in _DECIDING_ATTRIBUTES:
                        return None
                    in_attribute.update((int(number), True) for number in _HOLE.findall(value))
    parts = _HOLE.split(inlined)
    numbers = [int(number) for number in parts[1::2]]
    if sorted(numbers) != list(range(count)) or len(in_attribute) != count:
        return None  # a hole lost, doubled, or in a comment, raw text or a tag's name
    return Shape(parts[0::2], [(number, in_attribute[number]) for number in numbers])


def reads_output(tree: nodes.Template) -> bool:
    """Whether a template's code can read rendered output rather than only print it: a filter
    or set block, a macro, a call block, an import, or `super()`, `self.x()`, `caller()` or
    `loop()` other than printed as they are. Such code would see holes, not values."""
    capturing = (nodes.FilterBlock, nodes.AssignBlock, nodes.CallBlock, nodes.Macro)
    if any(True for _ in tree.find_all((*capturing, nodes.Import, nodes.FromImport))):
        return True
    printed = {id(child) for output in tree.find_all(nodes.Output) for child in output.nodes}
    printed_callees = set()
    for call in tree.find_all(nodes.Call):
        if _renders_output(call.node):
            if id(call) not in printed:
                return True
            printed_callees.add(id(call.node))
    return any(
        _renders_output(node) and id(node) not in printed_callees
        for node in tree.find_all(nodes.Getattr)
    )


def _renders_output(callee: nodes.Node) -> bool:
    """`super`, `caller`, `loop` (a recursive loop) or `self.x`: calling it renders template
    code into a string."""
    if isinstance(callee, nodes.Name):
        return callee.name in ("super", "caller", "loop")
    return (
        isinstance(callee, nodes.Getattr)
        and isinstance(callee.node, nodes.Name)
        and callee.node.name == "self"
    )


def _holes_quoted(page: str) -> bool:
    """Every hole inside a tag of the page is inside a quoted attribute value."""
    for tag in _SOURCE_TAG.finditer(page):
        text = tag[0]
        if "\ue000" in text:
            inside = sum(value.count("\ue000") for value in _SOURCE_QUOTED.findall(text))
            if inside != text.count("\ue000"):
                return False
    return True


def _fillable(values: list[str]) -> bool:
    return not any(_UNFILLABLE.search(value) for value in values)


def _numbered(page: str, count: int) -> bool:
    return sorted(int(number) for number in _HOLE.findall(page)) == list(range(count))


def _filled(page: str, values: list[str]) -> str:
    """The page as the render would have printed it: each hole its value, escaped."""
    if not values:
        return page
    return _HOLE.sub(lambda hole: escape(values[int(hole[1])]), page)


def _tag_name(tag: str) -> str:
    return tag[1:].split(None, 1)[0].rstrip(">/").lower() if len(tag) > 1 else ""


def _text(value: str) -> str:
    """A value as the inliner's serializer writes text."""
    return (
        value.replace("&", "&amp;")
        .replace("\xa0", "&nbsp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )


def _attribute_text(value: str) -> str:
    """A value as the inliner's serializer writes a double-quoted attribute value."""
    return value.replace("&", "&amp;").replace("\xa0", "&nbsp;").replace('"', "&quot;")
