"""Request fields of issue 16 (tags, metadata, timezone, unsubscribe_url): checked at once,
stored as given, counted by `status --tag`, shown by `inspect`; and `keygen --dkim`."""

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from dispatcher import wire
from dispatcher.cli import main
from dispatcher.errors import InvalidRequest, RequestTooLarge
from dispatcher.settings import SpoolSettings
from dispatcher.spool import Finish, Incoming, Spool, open_spool
from tests.content_templates import write_order_templates
from tests.daemon import write_settings
from tests.postgres import spool_section

BASE = {"v": 1, "template": "order", "to": "ada@example.com"}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"tags": "a"}, "tags: expected a list of tag names"),
        ({"tags": ["ok", "no spaces"]}, "tags[1]: 'no spaces' is not a tag"),
        ({"tags": [str(i) for i in range(11)]}, "tags: 11 tags, at most 10"),
        ({"metadata": ["x"]}, "metadata: expected an object"),
        ({"metadata": {"x": "y" * 3000}}, "metadata: 3008 bytes as JSON, at most 2048"),
        ({"timezone": "Mars/Olympus"}, "timezone: 'Mars/Olympus' is not an IANA time zone"),
        ({"timezone": "../../etc/passwd"}, "timezone: '../../etc/passwd' is not an IANA"),
        ({"unsubscribe_url": "http://example.com/u"}, "unsubscribe_url: expected an https://"),
        ({"unsubscribe_url": "https://e.com/u\r\nBcc: x@e.com"}, "unsubscribe_url: printable"),
        ({"unsubscribe_url": "https://e.com/<u>"}, "unsubscribe_url: 'https://e.com/<u>' is not"),
        (
            {"unsubscribe_url": "https://e.com/u", "headers": {"List-Unsubscribe": "<x>"}},
            "List-Unsubscribe is written from unsubscribe_url",
        ),
    ],
)
def test_bad_values_are_refused_by_client_and_daemon(fields: dict[str, Any], error: str) -> None:
    frame = orjson.dumps({**BASE, **fields})
    with pytest.raises((InvalidRequest, RequestTooLarge)) as caught:
        wire.decode(frame)
    assert error in str(caught.value)
    if "List-Unsubscribe" not in error:  # a rule of one field: the client's check has it too
        with pytest.raises((InvalidRequest, RequestTooLarge)):
            wire.check(orjson.loads(frame), len(frame))


def test_the_fields_survive_the_round_trip_through_the_spool_form() -> None:
    fields = wire.request_fields(
        "order",
        {
            "to": "ada@example.com",
            "tags": ("spring", "vip", "spring"),
            "metadata": {"customer": 42, "plan": "pro"},
            "timezone": "Europe/Vienna",
            "unsubscribe_url": "https://example.com/u?x=1&y=2",
        },
    )
    request = wire.decode(wire.encode(fields))
    assert request.tags == ("spring", "vip")
    assert request.metadata == {"customer": 42, "plan": "pro"}
    assert wire.validate(wire.to_fields(request)) == request


def stored(spool: Spool, request_id: str, tags: list[str], template: str = "order") -> None:
    fields = {**BASE, "id": request_id, "template": template, "tags": tags}
    spool.add([Incoming.of(wire.validate(fields))], [], time.time())


def test_status_tag_counts_by_state_and_inspect_shows_tags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store: SpoolSettings
) -> None:
    templates = write_order_templates(tmp_path)  # template.yaml tags the order template "orders"
    (templates / "other").mkdir()
    (templates / "other" / "subject.txt").write_text("Hi")
    (templates / "other" / "body.txt").write_text("Hi")
    settings = write_settings(
        tmp_path, 1025, templates={"dir": str(templates)}, spool=spool_section(store)
    )
    with open_spool(store, "test") as spool:
        stored(spool, "a", ["spring"], "other")
        stored(spool, "b", ["spring", "vip"], "other")
        stored(spool, "c", ["springtime"], "other")  # a tag that merely starts the same
        stored(spool, "d", [], "order")
        spool.claim(time.time() + 1, 10)
        spool.record([], [Finish("a", "dead", time.time(), "550 no")])
    assert main(["status", "--tag", "spring", "--json", "--settings", str(settings)]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["counts"] == {"queued": 1, "retry": 0, "sending": 0, "sent": 0, "dead": 1}
    assert main(["status", "--tag", "orders", "--settings", str(settings)]) == 0
    table = capsys.readouterr().out
    assert "tag orders" in table and "queued             1" in table and "order (template" in table
    assert main(["inspect", "b", "--settings", str(settings)]) == 0
    assert "tags         spring, vip" in capsys.readouterr().out


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_keygen_dkim_writes_a_private_key_and_prints_the_dns_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    settings = write_settings(tmp_path, 1025)
    keys = tmp_path / "keys"
    argv = ["keygen", "s1", "--dkim", "--algorithm", algorithm, "--dir", str(keys)]
    assert main([*argv, "--settings", str(settings)]) == 0
    out = capsys.readouterr().out
    assert (keys / "s1.dkim.key").stat().st_mode & 0o777 == 0o600
    kind = "rsa" if algorithm == "rsa-sha256" else "ed25519"
    assert f's1._domainkey.example.com. IN TXT ( "v=DKIM1; k={kind}; p=' in out
    assert main([*argv, "--settings", str(settings)]) == 2  # never overwrites a key
    assert "exists; refusing to overwrite" in capsys.readouterr().err
