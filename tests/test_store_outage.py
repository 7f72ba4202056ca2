"""A store that cannot be written (a full disk, a lock held too long, a database turned
read-only) never stops the daemon: intake stops acknowledging, every write is tried again, and
once the store is back everything is delivered, once."""

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import orjson
import pytest
import zmq

import dispatcher
from dispatcher import overflow
from dispatcher.service import Daemon
from dispatcher.settings import SpoolSettings
from dispatcher.spool import open_reader
from dispatcher.spool.sqlite import SqliteSpool
from tests.daemon import InProcessDaemon, run_cli, write_settings
from tests.disks import SmallDisk, fill
from tests.postgres import PostgresServer, spool_section
from tests.smtp_server import SmtpServer, free_port
from tests.test_metrics import scrape_until

RunDaemon = Callable[..., InProcessDaemon]
PADDING = "x" * 20_000  # a 20 KB request: each needs new pages in the spool
AVAILABLE = ("dispatcher_store_available", ())

pytestmark = pytest.mark.usefixtures("fresh_client")


def limit_pages(pages: int | None) -> Callable[[Daemon], None]:
    """On the daemon's thread: let its spool grow to `pages` pages (None: to what it has now,
    a full disk as SQLite sees it)."""

    def limit(daemon: Daemon) -> None:
        db = cast(SqliteSpool, daemon.spool).db
        if pages is None:
            (now,) = db.execute("pragma page_count").fetchone()
            db.execute(f"pragma max_page_count = {now}")
        else:
            db.execute(f"pragma max_page_count = {pages}")

    return limit


def enqueue(count: int) -> list[str]:
    return [
        dispatcher.enqueue_email(
            "welcome",
            to=f"user{i}@example.com",
            context={"name": "Ada", "activate_url": "https://example.com/a", "pad": PADDING},
        )
        for i in range(count)
    ]


def test_a_full_spool_is_waited_out_and_every_request_is_delivered_once(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    port = free_port()
    settings = write_settings(
        tmp_path,
        smtp_server.port,
        client={"ack_timeout": 0.5},
        metrics={"bind": f"127.0.0.1:{port}"},
    )
    daemon = run_daemon(settings)
    daemon.call(limit_pages(None))
    dispatcher.configure(settings)
    ids = enqueue(100)
    daemon.wait_for_log("store unavailable: spool ")
    scrape_until(port, {AVAILABLE: 0})
    # Nothing acknowledged: the client spills what it holds, and says it did not all go.
    assert dispatcher.flush(5) is False
    assert daemon.counts()["queued"] == 0
    # In a longer outage what arrives is read and dropped, so re-sends cannot pile up in
    # memory: a client's request comes again, a frame without a client id is lost and counted.
    daemon.wait_for_log("intake drops what arrives until the store is back")
    ids += enqueue(3)
    send_anonymous(daemon)
    wait_until(lambda: daemon.call(lambda d: d.intake.shed_anonymous) == 1)
    assert daemon.alive

    daemon.call(limit_pages(1_000_000))  # space is freed
    messages = smtp_server.wait_for(103, timeout=60)
    daemon.wait_for_counts(sent=103, dead=0, queued=0, retry=0)
    scrape_until(port, {AVAILABLE: 1})
    delivered = sorted(m.message["Message-ID"].partition("@")[0].lstrip("<") for m in messages)
    assert delivered == sorted(ids)  # each once
    daemon.wait_for_log("1 frames without a client id were dropped while the store was unavailable")
    assert daemon.log.count("store unavailable:") == 1
    assert daemon.log.count("store available again after") == 1
    assert "Traceback" not in daemon.log


def send_anonymous(daemon: InProcessDaemon) -> None:
    """A fire-and-forget frame from a plain PUSH socket: no client id, so no receipt."""
    frame = orjson.dumps(
        {"v": 1, "template": "welcome", "to": "x@example.com", "context": {"name": "X"}}
    )
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(daemon.settings.intake.bind)
        push.send(frame)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Bounded poll."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@contextmanager
def writes_refused(store: SpoolSettings, request: pytest.FixtureRequest) -> Iterator[None]:
    """Every write to the store fails until the block ends: on SQLite another process holds
    the write lock past the busy timeout; on PostgreSQL the database turns read-only and its
    sessions are cut, as when the address still leads to the old primary after a failover."""
    if store.url is None:
        blocker = sqlite3.connect(store.path, isolation_level=None)
        blocker.execute("begin immediate")
        try:
            yield
        finally:
            blocker.execute("rollback")
            blocker.close()
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = store.url.split("/")[3].split("?")[0]
    server.admin(f'alter database "{name}" set default_transaction_read_only = on')
    server.admin(f"select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}'")
    try:
        yield
    finally:
        server.admin(f'alter database "{name}" reset default_transaction_read_only')


def test_an_outcome_the_store_cannot_take_waits_and_is_recorded_once(
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: RunDaemon,
    store: SpoolSettings,
    request: pytest.FixtureRequest,
) -> None:
    """The store refuses writes while a message is being sent: its outcome waits in memory,
    the request is never claimed again, and the outcome is recorded once the store is back."""
    settings = write_settings(tmp_path, smtp_server.port, spool=spool_section(store))
    daemon = run_daemon(settings)
    smtp_server.slow_reply(3.0)  # time to refuse writes while the message is on its way
    dispatcher.configure(settings)
    [request_id] = enqueue(1)
    daemon.wait_for_counts(sending=1)
    with writes_refused(store, request):
        daemon.wait_for_log(f"sent {request_id}", timeout=60)
        daemon.wait_for_log("store unavailable: spool", timeout=60)
        waiting = daemon.call(lambda d: [f.request_id for f in d.delivery.journal.finishes])
        assert waiting == [request_id]
    daemon.wait_for_counts(sent=1, sending=0)
    daemon.wait_for_log("store available again after", timeout=30)
    with open_reader(store) as spool:
        report = spool.inspect(request_id)
    assert report is not None
    assert [a["outcome"] for a in report["attempt_log"]] == ["sent"]
    assert not report["maybe_duplicate"]
    assert len(smtp_server.messages) == 1


def test_a_full_file_system_under_the_spool_is_waited_out_and_shown_by_status(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon, small_disk: SmallDisk
) -> None:
    disk = small_disk(8 * 1024 * 1024)
    spool_path = disk / "spool.sqlite3"
    settings = write_settings(
        tmp_path, smtp_server.port, spool={"path": str(spool_path)}, client={"ack_timeout": 0.5}
    )
    daemon = run_daemon(settings)
    filler = fill(disk)
    dispatcher.configure(settings)
    ids = enqueue(30)
    daemon.wait_for_log("store unavailable: spool ")
    result = run_cli("status", settings=settings)
    assert f"WARNING: the file system holding {spool_path} is full" in result.stdout
    assert (
        "is full"
        in orjson.loads(run_cli("status", "--json", settings=settings).stdout)["write_problem"]
    )

    filler.unlink()
    assert len(smtp_server.wait_for(30, timeout=60)) == 30
    daemon.wait_for_counts(sent=30, queued=0, retry=0)
    assert "WARNING" not in run_cli("status", settings=settings).stdout
    assert len(ids) == 30 and "Traceback" not in daemon.log


def test_status_without_a_daemon_on_a_full_file_system_says_so(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk(1024 * 1024)
    SqliteSpool(disk / "spool.sqlite3", "test").close()  # a reader then creates its -shm file
    settings = write_settings(tmp_path, 1025, spool={"path": str(disk / "spool.sqlite3")})
    fill(disk)
    result = run_cli("status", settings=settings)
    assert result.returncode == 2
    assert f"the file system holding {disk / 'spool.sqlite3'} is full" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_overflow_disk_loses_nothing_on_the_client(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    """No daemon, and the overflow folder's file system is full: the requests stay in memory
    and are spilled once there is room again."""
    disk = small_disk(1024 * 1024)
    overflow_dir = disk / "overflow"
    settings = write_settings(
        tmp_path, 1025, client={"ack_timeout": 0.5, "overflow_dir": str(overflow_dir)}
    )
    filler = fill(disk)
    dispatcher.configure(settings)
    ids = enqueue(5)
    dispatcher.flush(1)
    filler.unlink()
    deadline = time.monotonic() + 20
    while set(ids) - spilled_ids(overflow_dir):
        assert time.monotonic() < deadline, f"not spilled: {set(ids) - spilled_ids(overflow_dir)}"
        time.sleep(0.05)


def spilled_ids(folder: Path) -> set[str]:
    return {
        str(orjson.loads(frame)["id"])
        for path in overflow.waiting(folder)
        for frame in overflow.read(path) or []
    }
