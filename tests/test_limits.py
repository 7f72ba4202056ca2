"""Limits: an over-limit request is refused at enqueue with the limit named; at the limit it passes.

The client (`wire.encode()`, the shape check) and the render worker (`wire.validate()`, the full
check) check the same limits; the daemon applies them to foreign frames too (see
test_injection.py, which pushes over-limit frames at a live daemon).
"""

import base64
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher import wire

TO = "ada@example.com"


def many(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def attachment(size: int) -> dict[str, str]:
    return {"filename": "a.bin", "data": base64.b64encode(b"x" * size).decode()}


CASES = [
    (
        {"to": many("u", 30), "cc": many("c", 20)},
        {"to": many("u", 30), "bcc": many("b", 21)},
        "51 recipients; at most 50 recipients per request",
    ),
    (
        {"to": TO, "context": {"x": "y" * (wire.MAX_CONTEXT_BYTES - 8)}},
        {"to": TO, "context": {"x": "y" * (wire.MAX_CONTEXT_BYTES - 7)}},
        "context: 65537 bytes as JSON, at most 65536 bytes",
    ),
    (
        {"to": TO, "headers": {f"X-{i}": "1" for i in range(wire.MAX_HEADERS)}},
        {"to": TO, "headers": {f"X-{i}": "1" for i in range(wire.MAX_HEADERS + 1)}},
        "headers: 21 headers, at most 20 are allowed",
    ),
    (
        {"to": TO, "headers": {"X-Long": "x" * wire.MAX_HEADER_CHARS}},
        {"to": TO, "headers": {"X-Long": "x" * (wire.MAX_HEADER_CHARS + 1)}},
        "headers.X-Long: at most 900 characters",
    ),
    (
        {"to": TO, "attachments": [attachment(1)] * wire.MAX_ATTACHMENTS},
        {"to": TO, "attachments": [attachment(1)] * (wire.MAX_ATTACHMENTS + 1)},
        "attachments: 11 files, at most 10 are allowed",
    ),
    (
        {"to": TO, "attachments": [attachment(wire.MAX_ATTACHMENT_BYTES)]},
        {"to": TO, "attachments": [attachment(wire.MAX_ATTACHMENT_BYTES + 1)]},
        "attachments[0]: 2097153 bytes, at most 2097152 bytes per file",
    ),
]  # fmt: skip


@pytest.mark.parametrize("check", [wire.validate, wire.encode], ids=["full", "shape"])
@pytest.mark.parametrize(("at_limit", "over_limit", "error"), CASES)
def test_over_limit_is_refused_naming_the_limit_and_the_limit_itself_passes(
    check: Callable[[dict[str, Any]], object],
    at_limit: dict[str, Any],
    over_limit: dict[str, Any],
    error: str,
) -> None:
    check({"v": 1, "template": "welcome", **at_limit})
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        check({"v": 1, "template": "welcome", **over_limit})


NAMES = ["../welcome", "welcome/../x", "_layouts", ".hidden", "a b", "/etc/passwd", "x" * 65,
         "welcome\x00", "wélcome", ""]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_template_names_outside_the_safe_pattern_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="template: "):
        wire.encode(wire.request_fields(name, {"to": TO}))
