"""Claims live in the spool: two daemons on one spool, SQLite file or PostgreSQL database,
never send a request twice."""

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dispatcher
from dispatcher.settings import SpoolSettings
from dispatcher.spool import open_reader
from tests.daemon import InProcessDaemon, write_settings
from tests.postgres import query, spool_section
from tests.smtp_server import SmtpServer

ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


def test_two_daemons_on_one_spool_send_each_request_once(
    tmp_path: Path,
    store: SpoolSettings,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
    fresh_client: None,
) -> None:
    (tmp_path / "b").mkdir()
    first, second = (
        write_settings(
            folder, smtp_server.port, smtp={"connections": 2}, spool=spool_section(store)
        )
        for folder in (tmp_path, tmp_path / "b")
    )
    smtp_server.slow_reply(seconds=0.03, times=400)  # the queue stays deep for seconds
    a, b = run_daemon(first), run_daemon(second)
    dispatcher.configure(first)  # everything enters through the first daemon's intake
    ids = [dispatcher.enqueue_email("welcome", to="a@example.com", context=ADA)
           for _ in range(200)]  # fmt: skip
    assert dispatcher.flush(20)
    smtp_server.wait_for(200, timeout=60)
    a.wait_for_counts(sent=200)
    assert a.stop() == 0 and b.stop() == 0
    sent = Counter(
        m.message_id.strip("<>").split("@")[0] for m in smtp_server.messages if m.message_id
    )
    assert set(sent) == set(ids) and max(sent.values()) == 1
    with open_reader(store) as spool:
        # every claim ended with its request
        assert query(spool, "select count(*) from requests where claimed_by is not null") == [(0,)]
        assert {d["owner"] for d in spool.daemons()} == {
            a.daemon.spool.owner,  # type: ignore[union-attr]
            b.daemon.spool.owner,  # type: ignore[union-attr]
        }
    shares = [sum(" dispatcher.delivery: sent " in line for line in d.lines) for d in (a, b)]
    assert sum(shares) == 200 and min(shares) > 0, shares  # each daemon did a share
