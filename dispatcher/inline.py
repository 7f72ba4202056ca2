"""Inline images: `{{ inline("logo.png") }}` in a template is a `cid:` URL, and the image travels
inside the message (multipart/related) rather than being fetched by the reader's client.
"""

import hashlib
import mimetypes
import re
from collections.abc import Callable, Iterable
from urllib.parse import unquote

from dispatcher.wire import MAX_ATTACHMENT_BYTES, Attachment

# A file name relative to the template folder or _layouts/: no '..', no absolute path.
INLINE_NAME = re.compile(r"\A(?!.*(?:\A|/)\.)[\w.-]+(?:/[\w.-]+)*\Z")
# `cid:` references in an HTML part: what must each have an image with that Content-ID.
_CID_URL = re.compile(r"""cid:([^"'\s)<>]+)""")


def content_id(filename: str, content: bytes) -> str:
    """A Content-ID (without its angle brackets) that is the same for the same file, so the
    same request renders to the same bytes."""
    digest = hashlib.sha256(content).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", filename.rpartition("/")[2])[:40]
    return f"{stem}.{digest}@inline"


def image(filename: str, content: bytes) -> Attachment:
    """A template's image as an inline attachment."""
    if len(content) > MAX_ATTACHMENT_BYTES:
        raise ValueError(
            f"inline: {filename} is {len(content)} bytes, at most {MAX_ATTACHMENT_BYTES}"
        )
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    name = filename.rpartition("/")[2]
    return Attachment(name, content_type, content, content_id(filename, content))


class InlineImages:
    """The images one render embeds: each file once, in the order first used.

    Passed to the template as `inline`; `read` finds a file by name and raises ValueError
    (shown with the template's file and line) for one it may not or cannot read.
    """

    def __init__(self, read: Callable[[str], Attachment]) -> None:
        self._read = read
        self.images: dict[str, Attachment] = {}

    def __call__(self, filename: object) -> str:
        if not isinstance(filename, str) or not INLINE_NAME.match(filename):
            raise ValueError(f"inline: {filename!r} is not a file name in the template folder")
        found = self.images.get(filename)
        if found is None:
            found = self.images[filename] = self._read(filename)
        return f"cid:{found.content_id}"


def missing_cids(html: str, inline: Iterable[Attachment]) -> list[str]:
    """The `cid:` URLs in `html` that no inline part answers: a reader would show a broken
    image, so a message with inline images is refused instead. (Composing runs this only for
    a message that has some: scanning every HTML part costs more than the rest of a header.)"""
    if "cid:" not in html:  # as inline() and mail authors write it
        return []
    known = {a.content_id for a in inline}
    return sorted({unquote(m[1]) for m in _CID_URL.finditer(html)} - known)
