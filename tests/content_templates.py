"""A template folder as a new user would write one: `order` in English (the unsuffixed files),
German and French, with an inline logo in the shared layout and a template.yaml."""

from pathlib import Path

# The smallest valid PNG: 1x1, transparent.
LOGO = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
)
UNSUBSCRIBE = "https://example.com/unsubscribe?u=42&t=abc"
FILES = {
    "_layouts/mail.html": (
        '<!DOCTYPE html>\n<html lang="{{ locale }}"><body>\n'
        '<img src="{{ inline("logo.png") }}" alt="Logo">\n'
        "{% block content %}{% endblock %}\n"
        '<img src="{{ inline("logo.png") }}" alt="">\n'  # the same file twice: embedded once
        "</body></html>\n"
    ),
    "order/subject.txt": "Your order {{ number }}",
    "order/subject.de.txt": "Ihre Bestellung {{ number }}",
    "order/subject.fr.txt": "Votre commande {{ number }}",
    "order/body.html": (
        '{% extends "_layouts/mail.html" %}{% block content %}'
        "<p>Placed on {{ placed | date('long') }}, total {{ total | currency('EUR') }}.</p>"
        "{% endblock %}"
    ),
    "order/body.de.html": (
        '{% extends "_layouts/mail.html" %}{% block content %}'
        "<p>Bestellt am {{ placed | date('long') }}, Summe {{ total | currency('EUR') }}.</p>"
        "{% endblock %}"
    ),
    "order/body.fr.html": (
        '{% extends "_layouts/mail.html" %}{% block content %}'
        "<p>Commandée le {{ placed | date('long') }}, total {{ total | currency('EUR') }}.</p>"
        "{% endblock %}"
    ),
    "order/template.yaml": f"tags: [orders]\nunsubscribe_url: {UNSUBSCRIBE}\n",
    "order/preview.yaml": (
        "default: {number: 42, placed: '2025-03-01T23:30:00+00:00', total: '1234.5'}\n"
        "vienna: {_locale: de-AT, _timezone: Europe/Vienna, number: 42,"
        " placed: '2025-03-01T23:30:00+00:00', total: '1234.5'}\n"
    ),
}
CONTEXT = {"number": 42, "placed": "2025-03-01T23:30:00+00:00", "total": "1234.5"}


def write_order_templates(root: Path) -> Path:
    """The `order` template and its layout under root/templates; returns that folder."""
    templates = root / "templates"
    for relative, text in FILES.items():
        path = templates / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (templates / "_layouts" / "logo.png").write_bytes(LOGO)
    return templates
