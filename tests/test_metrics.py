"""The Prometheus endpoint of a live daemon, scraped over HTTP as Prometheus would (on each
store for the queue depth it reads from the spool)."""

import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import dispatcher
from dispatcher import client
from dispatcher.errors import SettingsError
from dispatcher.settings import MetricsSettings, SpoolSettings
from tests.daemon import InProcessDaemon, run_cli, write_settings
from tests.postgres import spool_section
from tests.smtp_server import SmtpServer, free_port

RunDaemon = Callable[..., InProcessDaemon]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ADA = {"name": "Ada", "activate_url": "https://example.com/a"}


def scrape(port: int) -> Samples:
    """Every sample on the endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_until(port: int, expected: Samples, timeout: float = 20.0) -> Samples:
    """Bounded poll of the endpoint until every expected sample has its value."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if all(samples.get(key) == value for key, value in expected.items()):
            return samples
        if time.monotonic() > deadline:
            wrong = {k: (samples.get(k), v) for k, v in expected.items() if samples.get(k) != v}
            raise AssertionError(f"metrics (got, expected): {wrong}")
        time.sleep(0.05)


def messages(outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("dispatcher_messages_total", (("outcome", outcome),))


def depth(state: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("dispatcher_queue_depth", (("state", state),))


def test_the_counters_move_when_mail_is_sent(
    tmp_path: Path, store: SpoolSettings, smtp_server: SmtpServer, run_daemon: RunDaemon
) -> None:
    port = free_port()
    settings = write_settings(
        tmp_path,
        smtp_server.port,
        metrics={"bind": f"127.0.0.1:{port}"},
        spool=spool_section(store),
    )
    daemon = run_daemon(settings)
    before = scrape(port)
    assert all(before[messages(o)] == 0 for o in ("received", "sent", "retry", "dead", "rejected"))
    assert before[depth("queued")] == 0 and before[("dispatcher_smtp_connections", ())] == 0

    smtp_server.fail_data(times=1, reply="451 4.3.0 Try again later")
    smtp_server.refuse_recipient("gone@example.com", "550 5.1.1 No such user")
    dispatcher.configure(settings)
    try:
        for i in range(3):
            dispatcher.enqueue_email("welcome", to=f"user{i}@example.com", context=ADA)
        dispatcher.enqueue_email("welcome", to="gone@example.com", context=ADA)
        assert dispatcher.flush(10)
    finally:
        client.close()
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = 5000
        push.connect(daemon.settings.intake.bind)
        push.send(b"not a request")
    smtp_server.wait_for(3)
    daemon.wait_for_counts(sent=3, dead=1, rejected=1)

    after = scrape_until(
        port,
        {
            messages("received"): 4,
            messages("sent"): 3,
            messages("retry"): 1,
            messages("dead"): 1,
            messages("rejected"): 1,
            depth("sent"): 3,
            depth("dead"): 1,
            depth("queued"): 0,
            ("dispatcher_send_duration_seconds_count", ()): 5,
            ("dispatcher_enqueue_to_sent_seconds_count", ()): 3,
            ("dispatcher_oldest_queued_age_seconds", ()): 0,
        },
    )
    assert after[("dispatcher_send_duration_seconds_sum", ())] > 0
    # Workers keep their connections open between messages.
    assert after[("dispatcher_smtp_connections", ())] >= 1
    assert daemon.stop() == 0


def test_a_metrics_address_that_is_not_loopback_is_a_one_line_settings_error(
    tmp_path: Path,
) -> None:
    settings = write_settings(tmp_path, 1025, metrics={"bind": "0.0.0.0:9464"})
    result = run_cli("check", settings=settings)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "dispatcher: metrics.bind: expected a loopback HOST:PORT such as 127.0.0.1:9464,"
        " got '0.0.0.0:9464'"
    )


def test_a_metrics_port_in_use_stops_the_start_with_one_line(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = write_settings(tmp_path, smtp_server.port, metrics={"bind": f"127.0.0.1:{port}"})
        result = run_cli("run", settings=settings)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"metrics.bind: cannot listen on 127.0.0.1:{port}:" in result.stderr
    assert "Address already in use" in result.stderr


@pytest.mark.parametrize(
    ("bind", "address"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)), (None, None)],
)
def test_metrics_bind_is_a_loopback_host_and_port(
    bind: str | None, address: tuple[str, int] | None
) -> None:
    assert MetricsSettings(bind).address() == address


@pytest.mark.parametrize("bind", ["0.0.0.0:9464", "10.0.0.5:9464", "127.0.0.1", "127.0.0.1:0"])
def test_anything_else_is_refused(bind: str) -> None:
    with pytest.raises(SettingsError, match=r"metrics\.bind: expected a loopback HOST:PORT"):
        MetricsSettings(bind).address()
