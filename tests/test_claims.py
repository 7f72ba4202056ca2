"""Claims live in the spool: two daemons on one spool never send a request twice."""

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

import dispatcher
from dispatcher.spool.sqlite import SqliteReader
from tests.daemon import InProcessDaemon, write_settings
from tests.smtp_server import SmtpServer

ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


def test_two_daemons_on_one_spool_send_each_request_once(
    tmp_path: Path,
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
    fresh_client: None,
) -> None:
    first = write_settings(tmp_path, smtp_server.port, smtp={"connections": 2})
    (tmp_path / "b").mkdir()
    second = write_settings(tmp_path / "b", smtp_server.port, smtp={"connections": 2})
    data = yaml.safe_load(second.read_text())
    data["spool"]["path"] = str(tmp_path / "spool.sqlite3")  # the first daemon's spool
    second.write_text(yaml.safe_dump(data))
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
    with SqliteReader(tmp_path / "spool.sqlite3") as spool:
        owners = spool.db.execute("select count(*) from requests where claimed_by is not null")
        assert owners.fetchone() == (0,)  # every claim ended with its request
    shares = [sum(" dispatcher.delivery: sent " in line for line in d.lines) for d in (a, b)]
    assert sum(shares) == 200 and min(shares) > 0, shares  # each daemon did a share
