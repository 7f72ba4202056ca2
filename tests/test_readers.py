"""Reports read the spool without its write lock: they neither wait for nor stall a busy daemon."""

import sqlite3
import time
from pathlib import Path

import orjson

from dispatcher import wire
from dispatcher.spool import Incoming
from dispatcher.spool.sqlite import SqliteSpool
from tests.daemon import run_cli, write_settings


def test_status_and_inspect_answer_while_another_process_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    settings = write_settings(tmp_path, smtp_port=1)
    path = tmp_path / "spool.sqlite3"
    with SqliteSpool(path, "daemon") as spool:
        request = wire.validate({"v": 1, "id": "r1", "template": "welcome", "to": "a@x.org"})
        spool.add([Incoming.of(request)], [], time.time())
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("begin immediate")  # what a daemon in the middle of a commit holds
    try:
        started = time.monotonic()
        status = run_cli("status", "--json", settings=settings)
        inspect = run_cli("inspect", "r1", "--json", settings=settings)
        elapsed = time.monotonic() - started
    finally:
        writer.execute("rollback")
        writer.close()
    assert status.returncode == 0, status.stderr
    assert orjson.loads(status.stdout)["counts"]["queued"] == 1
    assert inspect.returncode == 0 and orjson.loads(inspect.stdout)["state"] == "queued"
    # A writer would have waited its 5 s busy timeout, twice, and failed.
    assert elapsed < 8, elapsed


def test_status_of_a_spool_that_does_not_exist_says_so(tmp_path: Path) -> None:
    result = run_cli("status", settings=write_settings(tmp_path, smtp_port=1))
    assert result.returncode == 2
    assert "no spool at" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "spool.sqlite3").exists()  # a report never creates one
