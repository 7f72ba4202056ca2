"""The MIME builder: every message it writes is parsed back with the stdlib, as a mail client
would, and checked for what RFC 5322 and RFC 2045-2047/2231 ask of its bytes (CRLF only, 7-bit,
folded lines, encoded words of at most 75 characters, quoted-printable lines of at most 76).
"""

import base64
import email
import email.header
import email.policy
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher import mime
from dispatcher.address import Address
from tests.test_render import content, parse

BOUNDARY = "=_0123456789abcdef.0"
ADA = Address("Ada Lovelace", "ada@example.com")
ENCODED_WORD = re.compile(rb"=\?utf-8\?([qb])\?([^?]*)\?=")
# Derandomised and bounded, as in test_fuzz.py: the gate runs the same examples every time.
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def build(
    subject: str = "Hello",
    to: Sequence[Address] = (ADA,),
    text: str = "Hi Ada\n",
    html: str | None = None,
    files: Sequence[tuple[str, str, bytes]] = (),
    headers: dict[str, str] | None = None,
) -> bytes:
    """A message of the shape Renderer writes, made with mime's functions alone."""
    fields = [
        mime.address_field("From", [Address("Shop", "shop@example.com")]),
        mime.address_field("To", to),
        mime.text_field("Subject", subject),
        mime.literal_field("Date", "Sat, 01 Mar 2025 12:30:00 +0000"),
        mime.literal_field("Message-ID", "<1@example.com>"),
        mime.literal_field("MIME-Version", "1.0"),
        *(mime.text_field(n, v, encode_long_words=False) for n, v in (headers or {}).items()),
    ]
    body = mime.text_part(text, "plain")
    if html is not None:
        body = mime.multipart("alternative", [body, mime.text_part(html, "html")], BOUNDARY + "a")
    if files:
        attached = [mime.attachment_part(*file) for file in files]
        body = mime.multipart("mixed", [body, *attached], BOUNDARY + "m")
    return mime.message(fields, body)


def assert_wire_form(data: bytes) -> None:
    """CRLF only, 7-bit, header lines folded to 78 where whitespace allows, none over 998,
    quoted-printable lines at most 76, encoded words at most 75 and whole characters each."""
    assert data.isascii()
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if len(line) > 78:  # only one word that cannot be broken may make a line long
            value = line if line[:1] == b" " else line.partition(b":")[2]
            assert len(value.split()) == 1, line
    for word in ENCODED_WORD.finditer(data):
        assert len(word[0]) <= 75, word[0]
        raw = word[2]
        decoded = (
            base64.b64decode(raw)
            if word[1] == b"b"
            else re.sub(rb"=([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]), raw)
        )
        decoded.decode("utf-8")  # no character split between two encoded words
    message = email.message_from_bytes(data, policy=email.policy.default)
    for part in message.walk():
        payload = part.get_payload()
        if isinstance(payload, str) and part["Content-Transfer-Encoding"] in (
            "quoted-printable",
            "base64",
        ):
            assert all(len(line) <= 76 for line in payload.split("\r\n")), part.get_content_type()


def display_name(data: bytes) -> str:
    """The To header's display name as RFC 2047 reads it.

    Python 3.11's address parser keeps the space between two adjacent encoded words of a display
    name (RFC 2047 6.2 says to drop it; the stdlib's own writer splits long names the same way we
    do, and its Subject parser drops it), so long encoded names are decoded with `decode_header`.
    """
    (address,) = parse(data)["To"].addresses
    raw = email.message_from_bytes(data, policy=email.policy.compat32)["To"]
    phrase = raw.replace("\r\n", "").rpartition(" <")[0].strip()
    if not phrase.startswith("=?"):
        return str(address.display_name)
    return str(email.header.make_header(email.header.decode_header(phrase)))


def test_plain_ascii_message_is_7bit_with_exactly_our_headers() -> None:
    data = build()
    assert_wire_form(data)
    message = parse(data)
    assert [name for name in message] == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]
    assert message["Content-Transfer-Encoding"] == "7bit"
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert content(message) == "Hi Ada\n"
    assert str(message["From"]) == "Shop <shop@example.com>"
    assert str(message["To"]) == "Ada Lovelace <ada@example.com>"


@pytest.mark.parametrize(
    "subject",
    [
        "Bienvenue Zoë ☃",
        "Grüße aus Köln, " * 12,
        "日本語の件名がとても長い場合でも正しく分割されるべきです。" * 4,
        "emoji 🎉🎉🎉 " * 20,
        "mixed ascii and ünïcödé words " * 6 + "x" * 200,
        "literal =?utf-8?q?=0A?=Bcc: evil@example.com text",
        "double  spaces é  kept  ☃  here",
        "a" * 300,
    ],
)
def test_subject_round_trips_through_encoded_words(subject: str) -> None:
    data = build(subject=subject)
    assert_wire_form(data)
    message = parse(data)
    assert message["Subject"] == subject
    assert "Bcc" not in message


def test_long_ascii_subject_is_folded_at_spaces_not_encoded() -> None:
    subject = "Your order of many small things " * 5
    data = build(subject=subject.strip())
    header = data.split(b"\r\n\r\n")[0]
    assert b"=?" not in header
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    assert parse(data)["Subject"] == subject.strip()


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("Ada Lovelace", b"To: Ada Lovelace <ada@example.com>"),
        ("Doe, John", b'To: "Doe, John" <ada@example.com>'),
        ("J. Doe", b'To: "J. Doe" <ada@example.com>'),
        ('Say "hi" \\ bye', b'To: "Say \\"hi\\" \\\\ bye" <ada@example.com>'),
        ("Zoë O'Brien, Co", b"To: =?utf-8?q?Zo=C3=AB_O=27Brien=2C_Co?= <ada@example.com>"),
        (
            "=?utf-8?q?=0A?=Bcc: evil",
            b"To: =?utf-8?b?PT91dGYtOD9xPz0wQT89QmNjOiBldmls?= <ada@example.com>",
        ),
    ],
)
def test_display_names_are_atoms_quoted_or_encoded(name: str, written: bytes) -> None:
    data = build(to=[Address(name, "ada@example.com")])
    assert_wire_form(data)
    assert written in data
    message = parse(data)
    (address,) = message["To"].addresses
    assert (address.display_name, address.addr_spec) == (name, "ada@example.com")
    assert "Bcc" not in message


def test_many_recipients_fold_between_addresses() -> None:
    to = [Address(f"Person Number {i} Ü", f"person{i}@example.com") for i in range(30)]
    data = build(to=to)
    assert_wire_form(data)
    header = data.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    addresses = parse(data)["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in addresses] == [
        (a.display_name, a.addr_spec) for a in to
    ]


def test_extra_headers_keep_long_urls_literal_and_encode_non_ascii() -> None:
    url = "<https://example.com/unsubscribe/" + "x" * 150 + ">"
    long_name = "X-" + "N" * 70
    headers = {
        "List-Unsubscribe": url,
        "X-Note": "café au lait",
        "X-Long": ("word " * 170).strip(),
        long_name: ("ünïcödé " * 20).strip(),
    }
    data = build(headers=headers)
    assert_wire_form(data)
    assert f"List-Unsubscribe: {url}\r\n".encode() in data  # encoding would break the URL
    message = parse(data)
    assert message["List-Unsubscribe"] == url
    assert message["X-Note"] == "café au lait"
    assert message["X-Long"] == ("word " * 170).strip()
    assert message[long_name] == ("ünïcödé " * 20).strip()


@pytest.mark.parametrize(
    "make",
    [
        lambda: mime.text_field("Subject", "Hi\r\nBcc: evil@example.com"),
        lambda: mime.text_field("X-Note", "a\nb"),
        lambda: mime.text_field("X-Note", "a\rb"),
        lambda: mime.literal_field("Message-ID", "<1@x>\r\nBcc: evil@example.com"),
        lambda: mime.literal_field("Date", "Sat, 01 Mar 2025 ☃"),
        lambda: mime.address_field("To", [Address("Ada\r\nBcc: evil", "ada@example.com")]),
        lambda: mime.address_field("To", [Address("Ada", "ada@example.com>\r\nBcc: <e@x")]),
        lambda: mime.address_field("To", [Address("Ada", "zoë@example.com")]),
        lambda: mime.address_field("To", [Address("Ada", "a b@example.com")]),
        lambda: mime.address_field("To", []),
        lambda: mime.text_field("X-Bad\r\nBcc", "x"),
        lambda: mime.text_field("X-Bad: x", "x"),
        lambda: mime.attachment_part("a\r\nBcc: evil.txt", "text/plain", b"x"),
        lambda: mime.attachment_part("a.txt", 'text/plain; x="\r\n"', b"x"),
        lambda: mime.attachment_part("a.txt", "téxt/plain", b"x"),
        lambda: mime.multipart("mixed", [], "bad boundary\r\n"),
        lambda: mime.text_field("X-Spaces", "a" + " " * 1000 + "b"),
    ],
)
def test_what_cannot_be_written_safely_is_refused(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_text_bodies_choose_7bit_quoted_printable_or_base64() -> None:
    """As the stdlib chooses: 7bit when it may, else the shorter of quoted-printable, base64."""
    cases = {
        "short ascii lines\n": "7bit",
        "x" * 79 + "\n": "quoted-printable",  # too long for a 7bit line
        "Merci, veuillez confirmer votre adresse électronique.\n": "quoted-printable",
        "Grüße, Zoë!\n": "base64",  # short and dense in non-ASCII: shorter in base64
        "日本語のテキスト。" * 40 + "\n": "base64",  # shorter than quoted-printable
        "nul \x00 byte\n": "quoted-printable",
    }
    for text, encoding in cases.items():
        data = build(text=text)
        assert_wire_form(data)
        message = parse(data)
        assert message["Content-Transfer-Encoding"] == encoding, text
        assert content(message) == text


def test_line_ends_are_made_crlf_and_a_final_one_is_added() -> None:
    message = parse(build(text="one\r\ntwo\rthree\nfour"))
    assert content(message) == "one\ntwo\nthree\nfour\n"


def test_quoted_printable_keeps_trailing_spaces_and_equals_signs() -> None:
    text = "a=b \nline with trailing tab\t\n" + "é" * 100 + "\n. a lone dot\nFrom here\n"
    data = build(text=text)
    assert_wire_form(data)
    assert content(parse(data)) == text


def test_alternative_then_mixed_structure_and_attachments_byte_for_byte() -> None:
    blob = random.Random(5).randbytes(10_000)
    files = [
        ("report.csv", "text/csv", b"a,b\r\n1,2\r\n"),
        ("données été.bin", "application/octet-stream", blob),
        ("empty.txt", "text/plain", b""),
    ]
    data = build(text="Hi\n", html="<p>Hi</p>\n", files=files)
    assert_wire_form(data)
    message = parse(data)
    assert message.get_content_type() == "multipart/mixed"
    body, *attached = message.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    assert content(message.get_body(("html",))) == "<p>Hi</p>\n"
    assert content(message.get_body(("plain",))) == "Hi\n"
    for part, (filename, content_type, raw) in zip(attached, files, strict=True):
        assert part.get_content_disposition() == "attachment"
        assert part.get_filename() == filename
        assert part.get_content_type() == content_type
        assert part.get_payload(decode=True) == raw
        assert "MIME-Version" not in part


@pytest.mark.parametrize(
    "filename",
    [
        "plain.txt",
        'with "quotes" and spaces.txt',
        "naïve résumé.pdf",
        "файл.txt",
        "a-very-long-file-name-" * 8 + ".csv",
        "très-long-" * 30 + "é.csv",
        "%41 literal percent.txt",
    ],
)
def test_filenames_round_trip_quoted_or_in_rfc_2231(filename: str) -> None:
    data = build(files=[(filename, "application/pdf", b"%PDF")])
    assert_wire_form(data)
    (attached,) = list(parse(data).iter_attachments())
    assert attached.get_filename() == filename
    disposition = attached["Content-Disposition"]
    if not filename.isascii():
        assert "filename*" in str(disposition.fold(policy=email.policy.SMTP))


def test_same_input_same_bytes() -> None:
    files = [("a.bin", "application/octet-stream", b"\x00\x01")]
    assert build(subject="Zoë", html="<p>x</p>", files=files) == build(
        subject="Zoë", html="<p>x</p>", files=files
    )


unicode_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=120
)
display_names = unicode_text.map(lambda s: " ".join(s.split()))
body_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=400)


@PROPERTY
@given(subject=unicode_text, name=display_names, note=unicode_text, text=body_text, html=body_text)
def test_any_unicode_subject_name_header_and_body_round_trips(
    subject: str, name: str, note: str, text: str, html: str
) -> None:
    """Whatever text reaches the builder comes back equal from the stdlib parser (a header
    value's leading and trailing spaces aside: a reader strips them)."""
    subject, note = subject.strip(" "), note.strip(" ")
    to = [Address(name, "ada@example.com")]
    data = build(subject=subject, to=to, text=text, html=html, headers={"X-Note": note})
    assert_wire_form(data)
    message = parse(data)
    assert message["Subject"] == subject
    assert message["X-Note"] == note
    assert display_name(data) == name
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    assert content(message.get_body(("plain",))) == (text if text.endswith("\n") else text + "\n")
    assert sorted(message.keys()) == sorted(
        "From To Subject Date Message-ID MIME-Version X-Note Content-Type".split()
    )


@PROPERTY
@given(
    filename=unicode_text.map(lambda s: s.strip()).filter(bool),
    raw=st.binary(max_size=300),
)
def test_any_file_name_and_content_round_trips(filename: str, raw: bytes) -> None:
    data = build(files=[(filename, "application/octet-stream", raw)])
    assert_wire_form(data)
    (attached,) = list(parse(data).iter_attachments())
    assert attached.get_filename() == filename
    assert attached.get_payload(decode=True) == raw


def test_date_field_writes_each_time_zone_even_for_the_same_instant() -> None:
    utc = datetime(2025, 3, 1, 12, 30, 5, 999_999, tzinfo=UTC)
    paris = utc.astimezone(timezone(timedelta(hours=1)))
    assert mime.date_field(utc).lines == "Date: Sat, 01 Mar 2025 12:30:05 +0000\r\n"
    assert mime.date_field(paris).lines == "Date: Sat, 01 Mar 2025 13:30:05 +0100\r\n"
    assert mime.date_field(utc).lines == "Date: Sat, 01 Mar 2025 12:30:05 +0000\r\n"
