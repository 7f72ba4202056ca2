"""Nothing lost: real app processes, real daemons killed with SIGKILL, a real SMTP server.

Each test counts the request ids that reached the SMTP server (the left part of each
Message-ID) against the ids the app processes printed: zero lost, duplicates bounded.
"""

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import yaml

from dispatcher.spool.sqlite import SqliteReader
from tests.daemon import ROOT, DaemonProcess, write_settings
from tests.smtp_server import SmtpServer

StartDaemon = Callable[[Path], DaemonProcess]
DEADLINE = 120.0  # seconds any one test may wait for its mail


def start_app(settings: Path, count: int, *options: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.app", str(settings), str(count), *options]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)


def enqueued_ids(app: subprocess.Popen[bytes], timeout: float) -> list[str]:
    """Wait for the app to exit (failing past `timeout`); every id its processes printed."""
    out, _ = app.communicate(timeout=timeout)
    assert app.returncode == 0
    lines = [orjson.loads(line) for line in out.splitlines()]
    return [request_id for line in lines for request_id in line["ids"]]


def delivered(smtp_server: SmtpServer) -> Counter[str]:
    return Counter(
        m.message_id.strip("<>").split("@")[0] for m in smtp_server.messages if m.message_id
    )


def wait_for_all(smtp_server: SmtpServer, ids: list[str], log: Callable[[], str]) -> Counter[str]:
    """Bounded poll until every id has arrived; fails with what is missing."""
    deadline = time.monotonic() + DEADLINE
    while True:
        seen = delivered(smtp_server)
        missing = set(ids) - set(seen)
        if not missing:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} of {len(ids)} never arrived\n{log()}")
        time.sleep(0.1)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stored_at_least(daemon: DaemonProcess, count: int) -> bool:
    counts = daemon.counts()
    return sum(counts[s] for s in ("queued", "retry", "sending", "sent")) >= count


def kill_twice(
    daemon: DaemonProcess, start: StartDaemon, smtp_server: SmtpServer, stored: int, sent: int
) -> DaemonProcess:
    """SIGKILL the daemon once while requests pour in (`stored` in its spool) and once while
    sends are in flight (`sent` at the server), restarting it each time; the last one."""
    wait_until(partial(stored_at_least, daemon, stored), f"{stored} requests stored")
    daemon.kill()
    daemon = start(daemon.settings_path)
    wait_until(lambda: len(delivered(smtp_server)) >= sent, f"{sent} requests delivered")
    daemon.kill()
    return start(daemon.settings_path)


def test_requests_enqueued_with_no_daemon_arrive_once_it_starts(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    settings = write_settings(tmp_path, smtp_server.port)
    app = start_app(settings, 500)
    ids = enqueued_ids(app, timeout=15)  # the app exits at once, within its exit wait
    assert len(set(ids)) == 500
    assert list((tmp_path / "overflow").iterdir()), "nothing was spilled"
    daemon = start_daemon(settings)
    seen = wait_for_all(smtp_server, ids, lambda: daemon.log)
    assert set(seen) == set(ids) and max(seen.values()) == 1
    daemon.wait_for_log("ingested")
    wait_until(lambda: not any((tmp_path / "overflow").iterdir()), "the overflow folder to empty")


def test_daemon_killed_twice_under_load_loses_nothing(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    settings = write_settings(tmp_path, smtp_server.port)
    daemon = start_daemon(settings)
    app = start_app(settings, 1500, "--pause-every", "20", "--flush", "60")
    daemon = kill_twice(daemon, start_daemon, smtp_server, stored=300, sent=200)
    ids = enqueued_ids(app, timeout=DEADLINE)
    seen = wait_for_all(smtp_server, ids, lambda: daemon.log)
    assert set(seen) == set(ids)
    duplicates = sum(seen.values()) - len(seen)
    # Only a send in flight at a kill may arrive twice: at most one per SMTP connection.
    assert duplicates <= 2 * daemon.settings.smtp.connections
    assert daemon.stop() == 0


def test_forked_children_like_gunicorn_workers_lose_nothing(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    settings = write_settings(tmp_path, smtp_server.port)
    daemon = start_daemon(settings)
    ids = enqueued_ids(start_app(settings, 100, "--children", "4"), timeout=60)
    assert len(set(ids)) == 500
    seen = wait_for_all(smtp_server, ids, lambda: daemon.log)
    assert set(seen) == set(ids) and max(seen.values()) == 1


def test_two_daemons_share_the_load_and_one_killed_loses_nothing(
    tmp_path: Path, smtp_server: SmtpServer, start_daemon: StartDaemon
) -> None:
    daemons = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        daemons.append(start_daemon(write_settings(tmp_path / name, smtp_server.port)))
    app_settings = tmp_path / "app.yaml"
    clients = [_client(d) for d in daemons]
    app_settings.write_text(
        yaml.safe_dump(
            {
                "client": {
                    "connect": [c["connect"][0] for c in clients],
                    "acks": [c["acks"][0] for c in clients],
                    "overflow_dir": str(tmp_path / "b" / "overflow"),  # b survives
                }
            }
        )
    )
    app = start_app(app_settings, 1000, "--pause-every", "20", "--flush", "60")
    for daemon in daemons:
        wait_until(partial(stored_at_least, daemon, 200), "each daemon to take a share")
    daemons[0].kill()
    ids = enqueued_ids(app, timeout=DEADLINE)
    # What a acknowledged waits in its spool (nothing else is missing) until it is back.
    with SqliteReader(daemons[0].settings.spool.path) as spool:
        held_by_a = set(spool.waiting_ids())
    wait_until(lambda: set(ids) - set(delivered(smtp_server)) <= held_by_a, "b to deliver the rest")
    start_daemon(daemons[0].settings_path)
    seen = wait_for_all(smtp_server, ids, lambda: daemons[1].log)
    assert set(seen) == set(ids)
    # Only what a held when it died can arrive twice: a send in flight, or a request it had
    # committed whose receipt died with it, so the client re-sent it to b.
    twice = {request_id for request_id, n in seen.items() if n > 1}
    assert twice <= held_by_a, f"{len(twice - held_by_a)} duplicates a did not hold"


def _client(daemon: DaemonProcess) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(daemon.settings_path.read_text())["client"]
    return data
