"""Locales: per-file variants along `de-AT` → `de` → unsuffixed, layouts too, Babel filters in
the mail's locale and time zone, gettext catalogs, and `check`/preview over every locale."""

from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo

from dispatcher import locales
from dispatcher.errors import TemplateError
from dispatcher.preview import PreviewApp
from dispatcher.render import Renderer, check_templates
from dispatcher.settings import load_settings
from tests.content_templates import CONTEXT, write_order_templates
from tests.test_render import MAIL_FROM, make_templates, parse, renderer_for


def subject_and_html(renderer: Renderer, locale: str | None) -> tuple[str, str]:
    parts = renderer.render_parts("order", CONTEXT, locale=locale)
    return parts.subject, parts.html or ""


def test_locale_tags_are_normalized_and_fall_back_to_their_language() -> None:
    assert locales.normalize("de_at") == "de-AT"
    assert locales.normalize("zh_hant_tw") == "zh-Hant-TW"
    assert locales.chain("de-AT") == ("de-AT", "de")
    assert locales.variant("welcome/body.html", "fr") == "welcome/body.fr.html"


def test_each_file_falls_back_on_its_own(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "hi/subject.txt": "Hello",
            "hi/subject.de.txt": "Hallo",
            "hi/subject.de-AT.txt": "Servus",
            "hi/body.txt": "English body",
            "hi/body.de.txt": "Deutscher Text",
        },
    )
    assert renderer.render_parts("hi", {}, locale="de-AT").subject == "Servus"
    assert renderer.render_parts("hi", {}, locale="de-AT").text == "Deutscher Text"
    assert renderer.render_parts("hi", {}, locale="de_CH").subject == "Hallo"
    assert renderer.render_parts("hi", {}, locale="ja").text == "English body"
    assert renderer.locales("hi") == ["en", "de", "de-AT"]


def test_the_layout_has_variants_too_and_gets_the_locale_for_html_lang(tmp_path: Path) -> None:
    templates = write_order_templates(tmp_path)
    (templates / "_layouts" / "mail.fr.html").write_text(
        '<html lang="{{ locale }}"><body>Bonjour {% block content %}{% endblock %}</body></html>'
    )
    renderer = Renderer(templates, MAIL_FROM)
    _, french = subject_and_html(renderer, "fr")
    assert '<html lang="fr">' in french and "Bonjour" in french
    _, german = subject_and_html(renderer, "de")
    assert '<html lang="de">' in german and "Bonjour" not in german


def test_dates_and_amounts_follow_the_mail_locale_and_time_zone(tmp_path: Path) -> None:
    renderer = Renderer(write_order_templates(tmp_path), MAIL_FROM)
    utc = renderer.render_parts("order", CONTEXT, locale="de").html or ""
    assert "1. März 2025" in utc and "1.234,50\xa0€" in utc  # 23:30 UTC is still March 1
    tokyo = renderer.render_parts("order", CONTEXT, locale="ja", timezone="Asia/Tokyo").html or ""
    # No ja files: the mail is the default (en) text, so it is formatted in en to match.
    assert "March 2, 2025" in tokyo and "€1,234.50" in tokyo and '<html lang="en">' in tokyo


def test_the_default_locale_comes_from_settings_or_template_yaml(tmp_path: Path) -> None:
    templates = write_order_templates(tmp_path)
    assert subject_and_html(Renderer(templates, MAIL_FROM, locale="fr"), None)[0] == (
        "Votre commande 42"
    )
    (templates / "order" / "template.yaml").write_text("locale: de\n")
    assert subject_and_html(Renderer(templates, MAIL_FROM, locale="fr"), None)[0] == (
        "Ihre Bestellung 42"
    )


def test_a_filter_given_a_bad_value_names_the_template_line(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, {"d/subject.txt": "Hi", "d/body.txt": "\n{{ when | date }}"})
    with pytest.raises(TemplateError, match="not an ISO 8601 date") as caught:
        renderer.render_parts("d", {"when": "yesterday"})
    assert caught.value.location == "templates/d/body.txt:2"


def test_gettext_catalogs_translate_strings_per_locale(tmp_path: Path) -> None:
    templates = make_templates(
        tmp_path,
        {
            "t/subject.txt": "{{ _('Welcome') }}",
            "t/body.html": "<p>{% trans %}Hello {{ name }}{% endtrans %}</p>",
        },
    )
    catalog = Catalog(locale="de")
    catalog.add("Welcome", "Willkommen")
    catalog.add("Hello %(name)s", "Hallo %(name)s")
    folder = templates / "_locales" / "de" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    with open(folder / "messages.mo", "wb") as mo:
        write_mo(mo, catalog)
    renderer = Renderer(templates, MAIL_FROM)
    german = renderer.render_parts("t", {"name": "<Ada>"}, locale="de-AT")
    assert german.subject == "Willkommen"
    assert german.html == "<p>Hallo &lt;Ada&gt;</p>"  # the value is still escaped
    assert renderer.render_parts("t", {"name": "Ada"}, locale="fr").subject == "Welcome"
    assert "de" in renderer.locales("t")


def test_check_renders_every_sample_in_every_locale(tmp_path: Path) -> None:
    templates = write_order_templates(tmp_path)
    renderer = Renderer(templates, MAIL_FROM)
    assert check_templates(renderer).failures == []
    (templates / "order" / "body.fr.html").write_text("{{ missing }}")
    failures = check_templates(Renderer(templates, MAIL_FROM)).failures
    assert failures == [
        f"templates/order/body.fr.html:1: 'missing' is undefined [template order, sample {s}]"
        for s in ("default, locale fr", "vienna, locale fr")
    ]


def test_preview_lists_the_locales_and_renders_a_sample_in_each(tmp_path: Path) -> None:
    write_order_templates(tmp_path)
    app = PreviewApp(load_settings(None, {"templates": {"dir": str(tmp_path / "templates")}}))
    page = app.handle("/templates/order").body.decode()
    assert "Locales: en, de, fr" in page and "/templates/order/default%40fr" in page
    assert "Locales: en" not in app.handle("/").body.decode()  # the index lists them plainly
    french = app.handle("/templates/order/default%40fr/eml").body
    assert parse(french)["Subject"] == "Votre commande 42"
    vienna = app.handle("/templates/order/vienna/html").body.decode()  # the sample's _locale
    assert "2. März 2025" in vienna and "€\xa01.234,50" in vienna


def test_without_a_catalog_gettext_leaves_strings_as_written(tmp_path: Path) -> None:
    renderer = renderer_for(
        tmp_path,
        {
            "t/subject.txt": (
                "{{ _('Welcome') }}"
                " {% trans count=2 %}{{ count }} item{% pluralize %}{{ count }} items{% endtrans %}"
            ),
            "t/body.html": "<p>{% trans %}Hello {{ name }}{% endtrans %}</p>",
        },
    )
    parts = renderer.render_parts("t", {"name": "<Ada>"}, locale="de")
    assert parts.subject == "Welcome 2 items"
    assert parts.html == "<p>Hello &lt;Ada&gt;</p>"
