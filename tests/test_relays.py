"""Relay health and failover against real aiosmtpd relays and in-process daemons: a relay that
greets with 421, refuses the login, hangs, or comes back; a fallback relay; `check --relays`.

Probes here are fast (`smtp.probe: [0.2, 0.5]`) and `retry.attempts` is 3, so a daemon that
spent attempts on the relay's failures would make requests dead within a second.
"""

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from dispatcher import cli
from dispatcher.admin import status_table
from dispatcher.client import Client
from dispatcher.settings import SpoolSettings, load_settings
from dispatcher.spool import open_reader
from tests.daemon import InProcessDaemon, write_settings
from tests.postgres import spool_section
from tests.relay_server import RelayServer, relay_server  # noqa: F401  (fixture)
from tests.smtp_server import SmtpServer, free_port

CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}
PROBE = [0.2, 0.5]


def settings(tmp_path: Path, port: int, spool: SpoolSettings | None = None, **smtp: Any) -> Path:
    return write_settings(
        tmp_path,
        port,
        smtp={"connections": 4, "timeout": 2, "probe": PROBE, **smtp},
        retry={"attempts": 3, "backoff": [0.05, 0.3], "max_age": 600},
        **({} if spool is None else {"spool": spool_section(spool)}),
    )


def enqueue(settings_path: Path, count: int, domain: str = "example.com") -> list[str]:
    with Client(load_settings(settings_path, environ={})) as client:
        ids = [
            client.enqueue_email("welcome", to=f"u{i}@{domain}", context=CONTEXT)
            for i in range(count)
        ]
        assert client.flush(10.0)
    return ids


def status(settings_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli.main(["status", "--json", "--settings", str(settings_path)]) == 0
    report: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return report


def relay_lines(daemon: InProcessDaemon, word: str) -> list[str]:
    return [line for line in daemon.lines if "dispatcher.relays" in line and word in line]


def wait_until(condition: Callable[[], bool], daemon: InProcessDaemon, timeout: float = 20) -> None:
    """Bounded poll of something the daemon does not log."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s\n{daemon.log}"
        time.sleep(0.05)


def test_a_relay_greeting_421_holds_the_queue_with_no_attempt_used_then_drains_it(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    run_daemon: Callable[..., InProcessDaemon],
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay_server.greeting = "421 4.3.2 Service not available"
    metrics_port = free_port()
    path = settings(tmp_path, relay_server.port)
    path.write_text(path.read_text() + f"metrics:\n  bind: 127.0.0.1:{metrics_port}\n")
    daemon = run_daemon(path)
    relay = f"127.0.0.1:{relay_server.port}"

    ids = enqueue(path, 30)
    daemon.wait_for_log(f"relay {relay} down: 421 4.3.2 Service not available")
    at_down = relay_server.accepted
    wait_until(lambda: relay_server.accepted >= at_down + 3, daemon)  # three probes, ~1.4 s

    assert daemon.counts()["dead"] == 0 and daemon.counts()["sent"] == 0
    assert at_down <= 4 + 1  # the workers' first sessions, and no more: one probe at a time
    assert relay_server.accepted <= at_down + 5
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    assert f'dispatcher_relay_up{{relay="{relay}"}} 0.0'.encode() in scrape
    (shown,) = status(path, capsys)["relays"]
    assert shown["relay"] == relay and shown["state"] == "down"
    assert shown["reason"].endswith("421 4.3.2 Service not available")  # a probe says "connect: "

    relay_server.greeting = None
    daemon.wait_for_counts(sent=30)
    assert (
        sorted(m.message_id or "" for m in relay_server.messages)
        == sorted({m.message_id or "" for m in relay_server.messages})
        and len(relay_server.messages) == 30
    )  # each once
    with open_reader(daemon.settings.spool) as spool:
        attempts = {(spool.inspect(i) or {})["attempts"] for i in ids}
    assert attempts == {1}  # only the one that went through: the relay's failures used none
    assert len(relay_lines(daemon, " down: ")) == 1 and len(relay_lines(daemon, "up again")) == 1
    assert "dispatcher.delivery: retry" not in daemon.log
    assert status(path, capsys)["relays"][0]["state"] == "up"


def test_a_wrong_password_is_one_clear_line_and_no_request_dies(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    run_daemon: Callable[..., InProcessDaemon],
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay_server.login = ("mailer", "right-horse-battery")
    password = tmp_path / "password"
    password.write_text("wrong-horse-battery\n")
    path = settings(tmp_path, relay_server.port, username="mailer", password_file=str(password))
    daemon = run_daemon(path)

    enqueue(path, 5)
    daemon.wait_for_log("down: 535 5.7.8 Authentication credentials invalid")
    at_down = relay_server.accepted
    wait_until(lambda: relay_server.accepted >= at_down + 2, daemon)  # still probing

    assert daemon.counts()["dead"] == 0
    (shown,) = status(path, capsys)["relays"]
    assert shown["state"] == "down" and "535 5.7.8 Authentication" in shown["reason"]
    assert cli.main(["status", "--settings", str(path)]) == 0
    table = capsys.readouterr().out
    assert f"127.0.0.1:{relay_server.port}" in table and "down since" in table
    assert daemon.daemon is not None  # and the service manager's status line says so:
    assert daemon.daemon.observer.relays_down == {f"127.0.0.1:{relay_server.port}"}
    password.write_text("right-horse-battery\n")  # the operator fixes the credential
    daemon.wait_for_counts(sent=5)
    assert "horse-battery" not in daemon.log
    assert len(relay_lines(daemon, " down: ")) == 1


def test_a_relay_that_accepts_and_never_greets_is_down_after_its_timeout(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    relay_server.hang = True
    path = settings(tmp_path, relay_server.port, timeout=0.5)
    daemon = run_daemon(path)

    enqueue(path, 3)
    daemon.wait_for_log("down: SMTPConnectTimeoutError")
    relay_server.hang = False
    daemon.wait_for_counts(sent=3, dead=0)


def test_mail_fails_over_to_the_fallback_and_goes_back_to_the_primary(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    smtp_server: SmtpServer,
    run_daemon: Callable[..., InProcessDaemon],
    capsys: pytest.CaptureFixture[str],
    store: SpoolSettings,
) -> None:
    """On each store: the relays' states are kept in the spool, for `status`."""
    relay_server.greeting = "421 4.3.2 Service not available"
    fallback = {"host": "127.0.0.1", "port": smtp_server.port, "connections": 2}
    path = settings(tmp_path, relay_server.port, store, fallback=[fallback])
    daemon = run_daemon(path)

    enqueue(path, 20)
    daemon.wait_for_counts(sent=20, dead=0)
    assert len(smtp_server.messages) == 20 and relay_server.messages == []
    daemon.wait_for_log(f"sending through 127.0.0.1:{smtp_server.port}")
    shown = [(r["relay"], r["state"]) for r in status(path, capsys)["relays"]]
    primary, second = f"127.0.0.1:{relay_server.port}", f"127.0.0.1:{smtp_server.port}"
    assert shown == [(primary, "down"), (second, "up")]

    relay_server.greeting = None
    daemon.wait_for_log(f"relay 127.0.0.1:{relay_server.port} up again")
    enqueue(path, 10, domain="example.org")
    daemon.wait_for_counts(sent=30, dead=0)
    assert len(relay_server.wait_for(10)) == 10 and len(smtp_server.messages) == 20
    assert [r["state"] for r in status(path, capsys)["relays"]] == ["up", "up"]


def test_a_throttling_relay_is_slowed_and_every_request_is_delivered(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    relay_server.fail_data(times=3, reply="451 4.7.0 Too many messages, slow down")
    path = settings(tmp_path, relay_server.port)
    daemon = run_daemon(path)

    enqueue(path, 12)
    daemon.wait_for_counts(sent=12, dead=0)
    (line,) = relay_lines(daemon, "too fast")  # three replies at once are one halving
    assert "451 4.7.0 Too many messages" in line and "slowing to" in line
    assert not relay_lines(daemon, " down: ")


def test_check_relays_reports_each_relay_in_one_line_and_sends_nothing(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    smtp_server: SmtpServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay_server.login = ("mailer", "right-horse-battery")
    password = tmp_path / "password"
    password.write_text("wrong-horse-battery\n")
    fallback = {"host": "127.0.0.1", "port": smtp_server.port}
    path = settings(
        tmp_path,
        relay_server.port,
        username="mailer",
        password_file=str(password),
        fallback=[fallback, {"host": "127.0.0.1", "port": free_port(), "timeout": 1}],
    )

    assert cli.main(["check", "--relays", "--settings", str(path)]) == 1
    primary, good, closed = capsys.readouterr().out.splitlines()
    assert primary.startswith(f"FAIL  127.0.0.1:{relay_server.port}  login: 535 5.7.8")
    assert "worked: connected, EHLO" in primary and "horse-battery" not in primary
    assert good.startswith(f"ok    127.0.0.1:{smtp_server.port}  connected, EHLO (")
    assert closed.startswith("FAIL") and "connect: SMTPConnectError" in closed

    password.write_text("right-horse-battery\n")
    path = settings(
        tmp_path, relay_server.port, username="mailer", password_file=str(password), fallback=[]
    )
    assert cli.main(["check", "--relays", "--settings", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        f"ok    127.0.0.1:{relay_server.port}  connected, EHLO, login as mailer ("
    )
    assert relay_server.messages == [] and smtp_server.messages == []


def test_the_status_table_says_whose_view_of_a_relay_it_is_when_daemons_differ() -> None:
    relays = [
        {"daemon": "a", "relay": "r:25", "state": "up", "since": 0.0, "reason": ""},
        {"daemon": "b", "relay": "r:25", "state": "down", "since": 0.0, "reason": "421 bye"},
    ]
    report: dict[str, Any] = {
        "spool": "spool",
        "counts": {},
        "oldest_waiting_seconds": None,
        "recent_failures": [],
        "relays": relays,
        "overflow_refused": None,
        "overflow_refused_dir": "refused",
        "write_problem": None,
        "daemons": [],
    }
    table = status_table(report, 0.0)
    assert "r:25" in table and "down since" in table and "421 bye  (seen by b)" in table
    assert "seen by" not in status_table({**report, "relays": relays[:1]}, 0.0)


def max_age_settings(tmp_path: Path, port: int, max_age: float) -> Path:
    return write_settings(
        tmp_path,
        port,
        smtp={"connections": 2, "timeout": 2, "probe": PROBE},
        retry={"attempts": 3, "backoff": [0.05, 0.3], "max_age": max_age},
    )


def test_max_age_holds_while_the_relay_is_down_and_nothing_is_sent_late(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    relay_server.greeting = "421 4.3.2 Service not available"
    path = max_age_settings(tmp_path, relay_server.port, max_age=1)
    daemon = run_daemon(path)
    enqueue(path, 3)
    daemon.wait_for_log(f"relay 127.0.0.1:{relay_server.port} down")
    daemon.wait_for_counts(dead=3, queued=0, retry=0)  # while the relay is still down
    assert daemon.log.count("gave up after 1 s in the queue, unsent") == 3
    relay_server.greeting = None
    daemon.wait_for_log(f"relay 127.0.0.1:{relay_server.port} up again")
    assert relay_server.messages == []


def test_a_request_past_max_age_when_a_daemon_starts_is_dead_not_sent(
    tmp_path: Path,
    relay_server: RelayServer,  # noqa: F811
    run_daemon: Callable[..., InProcessDaemon],
) -> None:
    """A host down for longer than `retry.max_age`: what waited in its spool is not sent."""
    path = max_age_settings(tmp_path, free_port(), max_age=60)  # no relay: nothing goes
    daemon = run_daemon(path)
    enqueue(path, 2)
    daemon.wait_for_counts(queued=2)
    daemon.stop()
    time.sleep(0.6)  # the downtime itself is what is tested: the requests age past max_age
    daemon = run_daemon(max_age_settings(tmp_path, relay_server.port, max_age=0.5))
    daemon.wait_for_counts(dead=2, queued=0, retry=0)
    assert relay_server.messages == []
