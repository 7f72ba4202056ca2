"""A store that cannot be written (a full disk, a lock held too long) never stops the daemon:
intake stops acknowledging, every write is tried again, and once the store is back everything
is delivered, once."""

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

import dispatcher
from dispatcher.service import Daemon
from dispatcher.spool.sqlite import SqliteReader, SqliteSpool
from tests.daemon import InProcessDaemon, write_settings
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
    assert daemon.alive

    daemon.call(limit_pages(1_000_000))  # space is freed
    messages = smtp_server.wait_for(100, timeout=60)
    daemon.wait_for_counts(sent=100, dead=0, queued=0, retry=0)
    scrape_until(port, {AVAILABLE: 1})
    delivered = sorted(m.message["Message-ID"].partition("@")[0].lstrip("<") for m in messages)
    assert delivered == sorted(ids)  # each once
    assert daemon.log.count("store unavailable:") == 1
    assert daemon.log.count("store available again after") == 1
    assert "Traceback" not in daemon.log


def test_an_outcome_the_store_cannot_take_waits_and_is_recorded_once(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    """Another process holds the spool's write lock past the busy timeout while a message is
    being sent: its outcome waits in memory, the request is never claimed again, and the
    outcome is recorded once the lock is gone."""
    settings = write_settings(tmp_path, smtp_server.port)
    daemon = run_daemon(settings)
    smtp_server.slow_reply(1.0)  # time to take the lock while the message is on its way
    dispatcher.configure(settings)
    [request_id] = enqueue(1)
    daemon.wait_for_counts(sending=1)
    blocker = sqlite3.connect(daemon.settings.spool.path, isolation_level=None)
    blocker.execute("begin immediate")
    try:
        daemon.wait_for_log(f"sent {request_id}", timeout=60)
        daemon.wait_for_log("store unavailable: spool ", timeout=60)
        waiting = daemon.call(lambda d: [f.request_id for f in d.delivery.journal.finishes])
        assert waiting == [request_id]
    finally:
        blocker.execute("rollback")
        blocker.close()
    daemon.wait_for_counts(sent=1, sending=0)
    daemon.wait_for_log("store available again after", timeout=30)
    with SqliteReader(daemon.settings.spool.path) as spool:
        report = spool.inspect(request_id)
    assert report is not None
    assert [a["outcome"] for a in report["attempt_log"]] == ["sent"]
    assert not report["maybe_duplicate"]
    assert len(smtp_server.messages) == 1
