"""Fuzzing: property-based tests of the wire decoder and request validator (hypothesis), and a
bounded socket-level run of random and mutated frames against a live daemon process.
"""

import base64
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispatcher import wire
from dispatcher.address import check_header_text, parse_address
from dispatcher.errors import InvalidRequest
from tests.daemon import DaemonProcess, write_settings
from tests.smtp_server import SmtpServer

StartDaemon = Callable[[Path], DaemonProcess]
CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}
# Derandomised: the gate runs the same examples every time, so it cannot flake; run with
# `--hypothesis-seed=random` locally to explore further.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
# Text a hostile sender would try: line breaks, encoded words, address punctuation.
hostile_text = st.text(
    st.sampled_from(list('ab@.<>",;:()\\ =?\r\n\t\x00\x85\u2028é☃')) | st.characters(),
    max_size=40,
)
addresses = st.one_of(
    hostile_text,
    st.emails(),
    st.lists(hostile_text | st.emails(), max_size=3),
    json_values,
)
request_fields = st.fixed_dictionaries(
    {"v": st.just(1), "template": st.sampled_from(["welcome", "../x", "_layouts"]) | st.text()},
    optional={
        "to": addresses,
        "cc": addresses,
        "bcc": addresses,
        "reply_to": addresses,
        "sender": hostile_text | st.emails() | json_values,
        "context": json_values,
        "headers": st.dictionaries(hostile_text, hostile_text | json_values, max_size=3),
        "attachments": json_values,
        "send_at": json_values,
        "priority": st.sampled_from(["high", "low"]) | json_values,
        "id": hostile_text,
        "locale": hostile_text,
    },
)


def check_request(request: wire.Request) -> None:
    """What every accepted request promises the renderer."""
    assert 1 <= len(request.recipients) <= wire.MAX_RECIPIENTS
    for address in (*request.to, *request.cc, *request.bcc, *request.reply_to):
        check_header_text(str(address), "address")
    for value in request.headers.values():
        check_header_text(value, "header")
    assert wire.validate(wire.to_fields(request)) == request  # the spool's form reads back


@FUZZ
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_gives_a_request_or_invalid_request(frame: bytes) -> None:
    try:
        request = wire.decode(frame)
    except InvalidRequest:
        return
    check_request(request)


@FUZZ
@given(request_fields)
def test_validate_accepts_only_requests_that_keep_every_rule(fields: dict[str, Any]) -> None:
    try:
        request = wire.validate(fields)
    except InvalidRequest as exc:
        assert str(exc) and "\n" not in str(exc)  # one line that says what is wrong
        return
    check_request(request)


@FUZZ
@given(hostile_text)
def test_an_accepted_address_is_one_mailbox_without_line_breaks(text: str) -> None:
    try:
        address = parse_address(text, "to")
    except InvalidRequest:
        return
    shown = str(address)
    check_header_text(shown, "to")
    assert parse_address(shown, "to") == address
    assert address.addr_spec.count("@") == 1


# Requests near the rules' edges, most of them valid: what the full check accepts must pass the
# shape check too, or the client would refuse a request the daemon would have sent.
names = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
mailbox = st.one_of(
    st.emails(),
    st.sampled_from(["a@b.co", "o'brien@example.co.uk", "a@exämple.com", "a@xn--exmple-cua.com",
                     f"{'x' * 64}@example.com", f"a@{'x' * 63}.com", "A.B+tag@Example.COM"]),
)  # fmt: skip
address = (
    mailbox
    | st.builds(lambda n, a: f"{n} <{a}>", names, mailbox)
    | st.builds(lambda n, a: f'"{n}" <{a}>', names, mailbox)
)
address_field = address | st.lists(address, min_size=1, max_size=3)
header_text = st.text(
    st.characters(blacklist_categories=["Cs", "Cc"]), max_size=wire.MAX_HEADER_CHARS
)
attachment = st.fixed_dictionaries(
    {"filename": names, "data": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())},
    optional={"content_type": st.sampled_from(["text/csv", "application/pdf", "x/y+z", "text"])},
)
moment = st.datetimes(timezones=st.timezones() | st.none()).map(lambda d: d.isoformat())
edge_fields = st.fixed_dictionaries(
    {"v": st.just(1), "template": st.from_regex(wire.TEMPLATE_NAME, fullmatch=True),
     "to": address_field},
    optional={
        "id": st.from_regex(wire.REQUEST_ID, fullmatch=True),
        "client": st.from_regex(wire.REQUEST_ID, fullmatch=True),
        "cc": address_field | st.just([]),
        "bcc": address_field | st.none(),
        "reply_to": address_field,
        "sender": address,
        "context": st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
        "headers": st.dictionaries(st.from_regex(wire.HEADER_NAME, fullmatch=True), header_text,
                                   max_size=3),
        "attachments": st.lists(attachment, max_size=2),
        "send_at": moment | st.sampled_from(["2030-01-01T10:00:00Z", "2030-01-01", "tomorrow"]),
        "priority": st.sampled_from([*wire.PRIORITIES, None, "urgent"]),
        "idempotency_key": st.text(max_size=wire.MAX_TEXT_CHARS + 1),
        "locale": st.from_regex(wire.LOCALE, fullmatch=True) | st.sampled_from(["de-AT", "e"]),
    },
)  # fmt: skip


@FUZZ
@given(edge_fields)
def test_the_shape_check_accepts_every_request_the_full_check_accepts(
    fields: dict[str, Any],
) -> None:
    try:
        request = wire.validate(fields)
    except InvalidRequest:
        event("refused by the full check")
        return
    event("accepted")
    wire.check(fields, len(orjson.dumps(fields)))  # the daemon's intake
    wire.encode(fields)  # the client
    check_request(request)


def mutated(frame: bytes, rng: random.Random) -> bytes:
    """A valid frame with a few bytes flipped, dropped, inserted or the tail cut off."""
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data))
        match rng.randrange(4):
            case 0:
                data[where] = rng.randrange(256)
            case 1:
                del data[where]
            case 2:
                data.insert(where, rng.choice(b'\r\n\x00"{}[],:=?@<>\\'))
            case _:
                del data[where:]
        if not data:
            break
    return bytes(data)


def fuzz_frames(count: int, seed: int) -> list[tuple[str, bytes]]:
    """(kind, frame): valid, mutated, random-JSON and random-byte frames, each with its own id."""
    rng = random.Random(seed)
    frames: list[tuple[str, bytes]] = []
    for i in range(count):
        valid = orjson.dumps({"v": 1, "id": f"fuzz-{i}", "template": "welcome",
                              "to": f"user{i}@example.com", "context": CONTEXT})  # fmt: skip
        kind = rng.randrange(4)
        if kind == 0:
            frames.append(("valid", valid))
        elif kind == 1:
            frames.append(("mutated", mutated(valid, rng)))
        elif kind == 2:
            junk = {"v": 1, "template": "welcome", rng.choice(["to", "cc", "x"]): rng.random()}
            frames.append(("json", orjson.dumps(rng.choice([junk, [1, 2], "to", None, {"v": 2}]))))
        else:
            frames.append(("bytes", rng.randbytes(rng.randrange(1, 200))))
    return frames


def test_live_daemon_survives_fuzzed_frames_and_accounts_for_each(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    """400 frames through a real PUSH socket: the daemon stays up, and every frame ends sent,
    dead (a mutation that still parses but breaks the template, reason kept) or rejected."""
    daemon = start_daemon(write_settings(tmp_path, smtp_server.port))
    frames = fuzz_frames(400, seed=4)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = 5000
        push.connect(daemon.settings.intake.bind)
        for _, frame in frames:
            push.send(frame)
    deadline = time.monotonic() + 60
    while True:  # bounded poll of the spool, which the daemon owns
        counts = daemon.counts()
        settled = counts["queued"] + counts["retry"] + counts["sending"] == 0
        if settled and counts["sent"] + counts["dead"] + counts["rejected"] >= len(frames):
            break
        assert time.monotonic() < deadline, f"counts {counts} after 60 s\n{daemon.log}"
        assert daemon.process.poll() is None, daemon.log
        time.sleep(0.05)
    # A mutation may leave the id valid but identical to another frame's only by chance,
    # and then the spool keeps one: every frame is accounted for, none twice.
    assert counts["sent"] + counts["dead"] + counts["rejected"] == len(frames)
    kinds = [kind for kind, _ in frames]
    assert counts["sent"] >= kinds.count("valid")
    assert counts["rejected"] >= kinds.count("json") + kinds.count("bytes")
    assert len(smtp_server.wait_for(counts["sent"])) == counts["sent"]
    assert daemon.stop() == 0


# The first rule of each distinct pattern: the address fields share theirs.
_FIRST_BY_PATTERN: dict[object, wire.Rule] = {}
for _rule in wire.RULES:
    if _rule.plain is not None:
        _FIRST_BY_PATTERN.setdefault(_rule.plain, _rule)
PLAIN_RULES = list(_FIRST_BY_PATTERN.values())


@pytest.mark.parametrize("rule", PLAIN_RULES, ids=[rule.name for rule in PLAIN_RULES])
def test_a_string_a_rules_plain_pattern_passes_its_shape_check_passes_too(rule: wire.Rule) -> None:
    """The shortcut in `wire.check` skips a rule's call for a string its `plain` matches."""
    assert rule.plain is not None
    plain = rule.plain

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(st.from_regex(plain, fullmatch=True))
    def shortcut_agrees(value: str) -> None:
        if len(value) <= wire.MAX_TEXT_CHARS and plain.match(value):
            rule.shape(value, rule.name)  # raises if the shortcut let through what it refuses

    shortcut_agrees()
