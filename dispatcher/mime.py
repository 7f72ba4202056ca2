"""RFC 5322 / MIME (RFC 2045-2047, 2231) messages written directly as bytes, in the one shape
we send (text, optional HTML alternative, optional attachments), 7-bit throughout.

Header injection cannot happen by construction: every header line is written by `_fold`, which
starts it with `Name: ` and joins words only with a space or CRLF-space; a word is an RFC 2047
encoded word or printable ASCII, and CR or LF in any value raises ValueError. The encoders are
the stdlib's; `benchmarks/render.py` compares the cost with `EmailMessage`.
"""

import binascii
import email.base64mime
import email.quoprimime
import email.utils
import functools
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from dispatcher.address import Address

MAX_LINE = 78  # RFC 5322 2.1.1: SHOULD, folded to where whitespace allows
MAX_HARD_LINE = 998  # RFC 5322 2.1.1: MUST, refused beyond
MAX_ENCODED_WORD = 75  # RFC 2047 2: including `=?utf-8?q?` and `?=`
_EW_TEXT = MAX_ENCODED_WORD - len("=?utf-8?q??=")  # encoded characters per encoded word: 63
_PARAM_CHUNK = 60  # characters of an RFC 2231 parameter value per continuation line
_LONG_WORD = 60  # a display-name word longer than this is encoded, so that it can be folded

_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext, at most what wire allows
_LITERAL_WORD = re.compile(r"[!-~]+")  # printable ASCII: written as it is
_PRINTABLE = re.compile(r"[ -~]*")  # the same with spaces
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_ADDR_SPEC = re.compile(r"[!-;=?-~]+@[!-;=?-~]+")  # ASCII, no space, '<' or '>'
_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z|~-]+")  # RFC 2045 token, for MIME types
_LONG_LINE = re.compile(rf"[^\n]{{{MAX_LINE + 1}}}")
# Bytes a Q encoded word carries as they are (RFC 2047 5(3), the strictest rule, for phrases);
# the space becomes '_'. Used to size a Q word without building it.
_Q_LITERAL = b" !*+-/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 2231 attribute-char: what a parameter value may carry without %XX.
_PARAM_SAFE = "!#$&+-.^_`|~"


class Field(NamedTuple):
    """One header field: its name, and its folded lines with the final CRLF."""

    name: str
    lines: str


class Part(NamedTuple):
    """A MIME entity: its header fields and its encoded body (ending in CRLF)."""

    fields: tuple[Field, ...]
    body: bytes


def text_field(name: str, value: str, *, encode_long_words: bool = True) -> Field:
    """An unstructured field (Subject, a request's extra headers): RFC 2047 where needed.

    Words that are not printable ASCII, or hold `=?` (which a reader would decode), become
    encoded words; consecutive ones share encoded words, since a reader drops the whitespace
    between two encoded words. `encode_long_words` also encodes words too long for a 78-character
    line (the stdlib does this for every field); extra headers keep them literal, because a
    List-Unsubscribe URL or a message id must not be encoded.
    """
    _refuse_line_breaks(name, value)
    if len(name) + 2 + len(value) <= MAX_LINE and _PRINTABLE.fullmatch(value) and "=?" not in value:
        return _fold(name, [value])  # the common case: one short ASCII line
    longest = MAX_LINE - 1 if encode_long_words else MAX_HARD_LINE - len(name) - 3
    words = value.split(" ")
    literal = [not word or _is_literal(word, longest) for word in words]
    out: list[str] = []
    start = 0
    while start < len(words):
        if literal[start]:
            out.append(words[start])
            start += 1
            continue
        last = start  # the run to encode ends at its last word that needs it
        for index in range(start + 1, len(words)):
            if words[index] and literal[index]:
                break
            if words[index]:
                last = index
        room = _first_room(name) - len(out) if not any(out) else _EW_TEXT
        out.extend(_encoded_words(" ".join(words[start : last + 1]), room))
        start = last + 1
    return _fold(name, out)


def _is_literal(word: str, longest: int) -> bool:
    """Whether a word can be written as it is: printable ASCII, short enough, and nothing a
    reader would decode as an encoded word."""
    return len(word) <= longest and "=?" not in word and bool(_LITERAL_WORD.fullmatch(word))


def date_field(moment: datetime) -> Field:
    """`Date: Sat, 01 Mar 2025 12:30:00 +0000`: RFC 5322 dates have no fractions of a second."""
    return _date_field(moment.replace(microsecond=0), moment.utcoffset())


@functools.lru_cache(maxsize=4)
def _date_field(moment: datetime, offset: timedelta | None) -> Field:
    """Cached: a busy daemon dates hundreds of mails in the same second, and formatting costs
    more than the rest of the header. `offset` is part of the key because datetimes of the same
    instant in two time zones are equal, yet are written differently."""
    return literal_field("Date", email.utils.format_datetime(moment))


def literal_field(name: str, value: str) -> Field:
    """A structured field we write ourselves (Date, Message-ID, MIME-Version): ASCII only."""
    _refuse_line_breaks(name, value)
    if not _PRINTABLE.fullmatch(value):
        raise ValueError(f"{name}: only printable ASCII can be written here: {value!r}")
    return _fold(name, value.split(" "))


def address_field(name: str, mailboxes: Sequence[Address]) -> Field:
    """From, To, Cc, Reply-To: `Name <addr>` mailboxes separated by commas.

    An ASCII display name of atoms is written as it is, one with specials (`,` `.` `"` ...) as a
    quoted string, a non-ASCII one (or one holding `=?`) as encoded words. The addr-spec must
    already be ASCII (its domain in punycode).
    """
    if not mailboxes:
        raise ValueError(f"{name}: no address to write")
    words: list[str] = []
    for index, mailbox in enumerate(mailboxes):
        _refuse_line_breaks(name, mailbox.display_name + mailbox.addr_spec)
        if not _ADDR_SPEC.fullmatch(mailbox.addr_spec):
            raise ValueError(f"{name}: {mailbox.addr_spec!r} is not an ASCII address")
        separator = "," if index < len(mailboxes) - 1 else ""
        if not mailbox.display_name:
            words.append(mailbox.addr_spec + separator)
            continue
        words.extend(_phrase(mailbox.display_name, _EW_TEXT if words else _first_room(name)))
        words.append(f"<{mailbox.addr_spec}>{separator}")
    return _fold(name, words)


def text_part(text: str, subtype: str) -> Part:
    """A text/plain or text/html part in UTF-8, line ends made CRLF, ending in a line end.

    7bit when the text is ASCII with lines of at most 78 characters, else quoted-printable, or
    base64 when that is shorter (mostly non-Latin text), as the stdlib chooses.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    if text.isascii() and "\x00" not in text and not _LONG_LINE.search(text):
        encoding, body = "7bit", text.replace("\n", "\r\n").encode("ascii")
    else:
        data = text.encode("utf-8")
        encoding = "quoted-printable"
        body = binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
        base64_size = (len(data) + 2) // 3 * 4
        if len(body) > base64_size + (base64_size // 76 + 1) * 2:
            encoding, body = "base64", _base64_lines(data)
    return Part(_text_part_fields(subtype, encoding), body)


@functools.lru_cache(maxsize=16)
def _text_part_fields(subtype: str, encoding: str) -> tuple[Field, ...]:
    return (
        _fold("Content-Type", [f"text/{_token(subtype)};", 'charset="utf-8"']),
        _fold("Content-Transfer-Encoding", [encoding]),
    )


def attachment_part(
    filename: str, content_type: str, content: bytes, content_id: str | None = None
) -> Part:
    """A file as base64 in 76-character lines, named by Content-Disposition's filename; with a
    `content_id`, an inline part that HTML shows as `cid:<content_id>` (RFC 2392)."""
    maintype, _, subtype = content_type.partition("/")
    fields = [
        _fold("Content-Type", [f"{_token(maintype)}/{_token(subtype or 'octet-stream')}"]),
        _fold("Content-Transfer-Encoding", ["base64"]),
    ]
    if content_id is not None:
        if not _ADDR_SPEC.fullmatch(content_id if "@" in content_id else f"{content_id}@x"):
            raise ValueError(f"Content-ID: {content_id!r} cannot be written")
        fields.append(_fold("Content-ID", [f"<{content_id}>"]))
    disposition = "attachment;" if content_id is None else "inline;"
    fields.append(_fold("Content-Disposition", [disposition, *_filename_param(filename)]))
    return Part(tuple(fields), _base64_lines(content))


def _base64_lines(data: bytes) -> bytes:
    """Base64 in CRLF-ended lines of 76, as `base64.encodebytes` writes them with LF, but in one
    C call rather than one per 57-byte line (about twice as fast on a 20 KB file)."""
    encoded = binascii.b2a_base64(data, newline=False)
    lines = [encoded[start : start + 76] for start in range(0, len(encoded), 76)]
    return b"\r\n".join(lines) + b"\r\n" if lines else b""


def multipart(subtype: str, parts: Iterable[Part], boundary: str) -> Part:
    """A multipart entity; the caller picks a boundary that occurs in none of the parts."""
    if not re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary):
        raise ValueError(f"not a valid MIME boundary: {boundary!r}")
    delimiter = f"--{boundary}\r\n".encode("ascii")
    chunks = []
    for part in parts:
        chunks += [delimiter, _header_block(part.fields), b"\r\n", part.body, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    fields = (_fold("Content-Type", [f"multipart/{_token(subtype)};", f'boundary="{boundary}"']),)
    return Part(fields, b"".join(chunks))


def message(fields: Iterable[Field], body: Part) -> bytes:
    """The whole message: our header fields, then the body entity's own fields and content."""
    return b"".join((_header_block((*fields, *body.fields)), b"\r\n", body.body))


def _header_block(fields: Iterable[Field]) -> bytes:
    # ASCII by construction; encoding strictly makes any slip a ValueError, never 8-bit output.
    return "".join(field.lines for field in fields).encode("ascii")


def _fold(name: str, words: Sequence[str]) -> Field:
    """`Name: w1 w2 ...`, breaking before a word (never before an empty one, which stands for an
    extra space) when the line would pass 78 characters; refused when a line must pass 998."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"not a valid header field name: {name!r}")
    line = f"{name}: {' '.join(words)}"
    if len(line) <= MAX_LINE:
        return Field(name, line + "\r\n")
    lines = []
    line = name + ":"
    bare = True  # nothing but the field name on this line yet
    for word in words:
        if word and not bare and len(line) + 1 + len(word) > MAX_LINE:
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
        bare = bare and not word
    lines.append(line)
    if any(len(line) > MAX_HARD_LINE for line in lines):
        raise ValueError(f"{name}: a line of more than {MAX_HARD_LINE} characters is needed")
    return Field(name, "\r\n".join(lines) + "\r\n")


def _first_room(name: str) -> int:
    """How many encoded characters the first encoded word can hold right after `Name: `."""
    return MAX_LINE - len(name) - len(": =?utf-8?q??=")


def _phrase(name: str, room: int) -> list[str]:
    """A display name as words: atoms, a quoted string, or encoded words."""
    if not all(_is_literal(word, _LONG_WORD) for word in name.split(" ") if word):
        return _encoded_words(name, room)  # which also splits a long word
    if _ATOMS.fullmatch(name):
        return name.split(" ")
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}"'.split(" ")


def _encoded_words(text: str, room: int) -> list[str]:
    """UTF-8 encoded words of at most 75 characters, never splitting a character; the first
    one holds at most `room` encoded characters (what is left of its line), but always one.

    Q when it is no longer than B (Latin text stays readable), else B, as the stdlib decides.
    """
    budget = min(_EW_TEXT, max(room, 12))  # 12: the longest character, 4 bytes, in Q
    data = text.encode("utf-8")
    q_size = len(data) + 2 * len(data.translate(None, _Q_LITERAL))
    use_q = q_size <= (len(data) + 2) // 3 * 4
    size = q_size if use_q else (len(data) + 2) // 3 * 4
    if size <= budget:
        return [_encoded_word(data, use_q)]
    words, chunk, chunk_size = [], bytearray(), 0
    for char in text:
        encoded = char.encode("utf-8")
        if use_q:
            char_size = len(encoded) + 2 * len(encoded.translate(None, _Q_LITERAL))
            grown = chunk_size + char_size
        else:
            char_size = (len(encoded) + 2) // 3 * 4
            grown = (len(chunk) + len(encoded) + 2) // 3 * 4
        if chunk and grown > budget:
            words.append(_encoded_word(bytes(chunk), use_q))
            chunk, grown, budget = bytearray(), char_size, _EW_TEXT
        chunk += encoded
        chunk_size = grown
    words.append(_encoded_word(bytes(chunk), use_q))
    return words


def _encoded_word(data: bytes, use_q: bool) -> str:
    if use_q:
        return email.quoprimime.header_encode(data, "utf-8")
    return email.base64mime.header_encode(data, "utf-8")


def _filename_param(filename: str) -> list[str]:
    """`filename="a.csv"`, or RFC 2231 `filename*=utf-8''...` (in continuations when long)."""
    _refuse_line_breaks("Content-Disposition", filename)
    plain = _LITERAL_WORD.fullmatch(filename.replace(" ", "!")) and "=?" not in filename
    if plain and len(filename) <= _PARAM_CHUNK:
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        return [f'filename="{quoted}"']
    value = "utf-8''" + urllib.parse.quote(filename, safe=_PARAM_SAFE)
    if len(value) <= _PARAM_CHUNK:
        return [f"filename*={value}"]
    chunks, start = [], 0
    while start < len(value):
        end = start + _PARAM_CHUNK
        if end < len(value):  # never split a %XX escape
            end -= 1 if value[end - 1] == "%" else 2 if value[end - 2] == "%" else 0
        chunks.append(value[start:end])
        start = end
    last = len(chunks) - 1
    return [f"filename*{i}*={chunk}{';' if i < last else ''}" for i, chunk in enumerate(chunks)]


def _token(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not a valid MIME type part: {value!r}")
    return value


def _refuse_line_breaks(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name}: CR or LF in a header value")
