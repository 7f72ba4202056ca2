"""Wire protocol v1: what a frame may hold, and the reason given for what it may not."""

import base64
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import pytest

from dispatcher import wire
from dispatcher.address import check_address, parse_address
from dispatcher.errors import InvalidRequest, RequestTooLarge


def frame(**fields: object) -> bytes:
    return orjson.dumps({"v": 1, "template": "welcome", "to": "ada@example.com", **fields})


def test_minimal_foreign_frame_gets_an_id_and_defaults() -> None:
    request = wire.decode(frame())
    assert len(request.id) == 32
    assert request.to[0].addr_spec == "ada@example.com"
    assert (request.priority, request.context, request.client) == ("normal", {}, None)


def test_full_request_round_trips_through_its_wire_form() -> None:
    fields = {
        "id": "abc-1",
        "client": "web-1",
        "to": ["Ada Lovelace <ada@example.com>", "bob@example.org"],
        "cc": "cc@example.com",
        "bcc": ["hidden@example.com"],
        "reply_to": "help@example.com",
        "sender": "Shop <shop@example.com>",
        "headers": {"X-Campaign": "spring"},
        "attachments": [
            {
                "filename": "a.csv",
                "content_type": "text/csv",
                "data": base64.b64encode(b"a,b\n").decode(),
            }
        ],
        "send_at": "2030-01-01T10:00:00+01:00",
        "priority": "high",
        "idempotency_key": "order-7",
        "locale": "de-AT",
        "context": {"name": "Zoë <O'Brien> & Co"},
    }
    request = wire.decode(frame(**fields))
    assert request.recipients == [
        "ada@example.com",
        "bob@example.org",
        "cc@example.com",
        "hidden@example.com",
    ]
    assert request.attachments[0].content == b"a,b\n"
    assert request.send_at == datetime(2030, 1, 1, 9, tzinfo=UTC)
    assert wire.decode(orjson.dumps(wire.to_fields(request))) == request


def encode(**options: Any) -> bytes:
    """The client's frame of a request given as `enqueue_email()` arguments."""
    return wire.encode(wire.request_fields("welcome", options))


def test_encode_turns_python_values_into_json() -> None:
    moment = datetime(2030, 1, 1, 9, 30, tzinfo=UTC)
    uid = UUID(int=7)
    context = {"at": moment, "price": Decimal("9.90"), "id": uid}
    data = orjson.loads(encode(to=("ada@example.com",), context=context, send_at=moment))
    assert data["context"] == {"at": "2030-01-01T09:30:00+00:00", "price": "9.90", "id": str(uid)}
    assert (data["to"], data["send_at"]) == (["ada@example.com"], "2030-01-01T09:30:00+00:00")


def test_unencodable_context_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="context: cannot be encoded"):
        encode(to="ada@example.com", context={"x": object()})


def test_oversize_frame_is_rejected_with_the_limit() -> None:
    big = frame(context={"blob": "x" * wire.MAX_FRAME_BYTES})
    with pytest.raises(RequestTooLarge, match=str(wire.MAX_FRAME_BYTES)):
        wire.decode(big)
    blob = base64.b64encode(b"x" * (wire.MAX_ATTACHMENT_BYTES - 1)).decode()
    files = [{"filename": f"{i}.bin", "data": blob} for i in range(3)]  # each within its limit
    with pytest.raises(RequestTooLarge, match=f"over the limit of {wire.MAX_FRAME_BYTES}"):
        wire.encode({"v": 1, "template": "welcome", "to": "ada@example.com", "attachments": files})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"sending 0", "not a JSON object"),
        (b"\xff\xfe\x00", "not a JSON object"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"template": "welcome", "to": "a@example.com"}', "v: unsupported protocol version None"),
        (frame(v=2), "v: unsupported protocol version 2"),
        (frame(bogus=1), "unknown field 'bogus'"),
        (orjson.dumps({"v": 1, "to": "a@example.com"}), "template: a template name"),
        (frame(template="../etc/passwd"), "is not a template name"),
        (frame(template="_layouts"), "is not a template name"),
        (frame(to=[]), "to: at least one recipient"),
        (frame(to="not-an-address"), "to[0]: 'not-an-address' is not a valid address"),
        (frame(to="a@example.com\r\nBcc: x@evil.com"), "to[0]: control characters"),
        (frame(to="=?utf-8?q?x?= <a@example.com>"), "encoded words"),
        (frame(to="alice@example.org)<bob@example.org>"), "to[0]"),
        (frame(cc=[1]), "cc[0]: expected an address string, got int"),
        (frame(headers={"X-Tag": "a\nBcc: x@evil.com"}), "headers.X-Tag: control characters"),
        (frame(headers={"Bcc": "x@evil.com"}), "headers: Bcc is set by the dispatcher"),
        (frame(headers={"Bad Name": "x"}), "not a valid header name"),
        (frame(priority="urgent"), "priority: 'urgent' is not one of high, normal, low"),
        (
            frame(send_at="2030-01-01T10:00:00"),
            "send_at: expected an ISO 8601 time with a UTC offset",
        ),
        (frame(context=[1]), "context: expected an object, got list"),
        (
            frame(attachments=[{"filename": "../x", "data": ""}]),
            "filename: expected a plain file name",
        ),
        (frame(attachments=[{"filename": "x", "data": "***"}]), "data: expected base64"),
        (frame(id="has space"), "id: 'has space' is not valid"),
        (frame(template="welcome\n"), "is not a template name"),
        (frame(id="abc\n"), "id: 'abc\\n' is not valid"),
        (frame(headers={"X-Tag\n": "x"}), "not a valid header name"),
        (frame(locale="de\n"), "locale: 'de\\n' is not valid"),
    ],
)
def test_bad_frames_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        wire.decode(data)
    assert reason in str(caught.value)


ADDRESS_CORPUS = [
    "ada@example.com", "Ada.Lovelace+tag@Example.COM", "o'brien@example.co.uk", "a@b",
    "a..b@example.com", ".a@example.com", "a.@example.com", "a@localhost", "a@-x.com",
    "a@x..com", "a@exämple.com", "zoë@example.com", "a@xn--exmple-cua.com", "a b@example.com",
    f"{'x' * 65}@example.com", f"a@{'x' * 64}.com", f"a@{'x.' * 130}com", "a@example.com.",
    "a@[127.0.0.1]", '"quoted"@example.com', "a@ex_ample.com", "a@123.com", "a@example.c",
]  # fmt: skip


@pytest.mark.parametrize("text", ADDRESS_CORPUS)
def test_the_cached_domain_path_agrees_with_email_validator(text: str) -> None:
    from email_validator import EmailNotValidError, validate_email

    try:
        expected: str | None = str(
            validate_email(text, check_deliverability=False, allow_smtputf8=False).normalized
        )
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = parse_address(text, "to").addr_spec
    except InvalidRequest:
        got = None
    assert got == expected


@pytest.mark.parametrize(
    "text", [*ADDRESS_CORPUS, "Ada <ada@example.com>", '"Doe, John" <j@x.org>']
)
def test_the_clients_shape_check_accepts_every_address_the_daemon_accepts(text: str) -> None:
    """The client may pass what the daemon then rejects (recorded, with the reason), but it
    must never refuse a request the daemon would have sent."""
    try:
        parse_address(text, "to")
    except InvalidRequest:
        return
    check_address(text, "to")
