"""Rate limits: a relay's pace (`smtp.rate`, halved when it says we go too fast) and the
limits per recipient domain (`limits.domains`), as pure rules and in a daemon against a real
aiosmtpd server. Timing tests use a few dozen mails and bounds that a wrong limit would break."""

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatcher.client import Client
from dispatcher.errors import SettingsError
from dispatcher.rates import SLOWDOWN, DomainLimits, Pace, is_throttle, recipient_domains
from dispatcher.settings import DomainLimit, load_settings
from dispatcher.spool import Row
from dispatcher.spool.sqlite import SqliteReader
from tests.daemon import InProcessDaemon, write_settings
from tests.smtp_server import SmtpServer

CONTEXT = {"name": "Ada", "activate_url": "https://example.com/a"}


def row(request_id: str, *to: str) -> Row:
    request = ('{"to": [' + ", ".join(f'"{a}"' for a in to) + "]}").encode()
    return Row(request_id, "welcome", request, 0.0, 0, None, None, [], {}, None, None)


@pytest.mark.parametrize(
    ("code", "reply", "throttle"),
    [
        (451, "451 4.7.0 Too many messages, slow down", True),
        (454, "454 Throttling failure: Maximum sending rate exceeded.", True),
        (421, "421 4.7.0 Rate limit exceeded", True),
        (421, "421 4.3.2 Service not available", False),
        (451, "451 4.3.0 Try again later", False),
        (550, "550 5.7.1 Too many recipients", False),  # permanent: never a slowdown
    ],
)
def test_a_reply_is_a_throttle_by_its_code_and_words(code: int, reply: str, throttle: bool) -> None:
    assert is_throttle(code, reply) is throttle


def test_sends_are_spaced_by_one_over_the_rate_across_connections() -> None:
    pace = Pace(20.0)
    delays = [pace.reserve(100.0) for _ in range(5)]  # five connections asking at once
    assert delays == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert pace.reserve(101.0) == 0.0  # a quiet second later: no debt, and no burst either


def test_a_throttle_halves_the_rate_once_per_burst_of_replies_then_it_recovers() -> None:
    pace = Pace(20.0)
    assert pace.slow_down(10.0) == 10.0
    assert pace.slow_down(10.2) is None  # another connection heard the same: one halving
    assert pace.slow_down(11.5) == 5.0
    assert pace.reserve(12.0) == 0.0 and pace.reserve(12.0) == pytest.approx(0.2)
    pace.reserve(11.5 + SLOWDOWN)
    assert pace.rate == 20.0  # SLOWDOWN seconds after the last throttle


def test_an_unlimited_relay_that_throttles_is_halved_from_what_it_was_sent() -> None:
    pace = Pace(None)
    for i in range(100):  # 20 a second for 5 s
        assert pace.reserve(i * 0.05) == 0.0
    assert pace.slow_down(5.0) == pytest.approx(10.0, rel=0.05)


def test_a_relay_that_throttles_the_first_burst_is_halved_from_that_burst() -> None:
    pace = Pace(None)
    for _ in range(8):  # eight sends at once, 50 ms after the start
        pace.reserve(0.05)
    assert pace.slow_down(0.06) == pytest.approx(4.0)  # 8 over the shortest span (1 s), halved


def test_a_domain_rate_holds_its_rows_one_slot_apart_and_lets_others_go() -> None:
    limits = DomainLimits({"slow.example": DomainLimit(rate=10)})
    held = [limits.admit(row(f"s{i}", f"u{i}@Slow.Example"), 50.0) for i in range(4)]
    assert held == [None, pytest.approx(50.1), pytest.approx(50.2), pytest.approx(50.3)]
    assert limits.admit(row("f", "u@fast.example"), 50.0) is None
    assert limits.admit(row("s1", "u1@slow.example"), 50.1) is None  # back in its slot


def test_a_request_to_several_domains_waits_for_the_strictest() -> None:
    limits = DomainLimits(
        {"a.example": DomainLimit(rate=100), "b.example": DomainLimit(connections=1)}
    )
    assert limits.admit(row("1", "x@a.example", "y@b.example"), 7.0) is None
    later = limits.admit(row("2", "z@b.example", "w@a.example"), 7.0)
    assert later is not None and later > 7.0  # b's one connection is busy
    limits.finished("1")
    assert limits.admit(row("2", "z@b.example", "w@a.example"), 7.1) is None


def test_recipient_domains_come_from_the_request_until_it_is_rendered() -> None:
    assert recipient_domains(row("1", "Ada <ada@A.example>", "b@b.example")) == {
        "a.example",
        "b.example",
    }


def test_rate_and_domain_settings_are_checked_with_the_key_named(tmp_path: Path) -> None:
    cases = {
        "smtp__rate": (0, "smtp.rate: must be positive"),
        "smtp__fallback": ([{"host": "b", "probe": [5, 1]}], "smtp.fallback[0].probe"),
        "limits__domains": ({"gmail.com": {"rate": -1}}, "limits.domains.gmail.com: rate"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("[", r"\[")):
            load_settings(None, {key: value}, environ={})
    with pytest.raises(SettingsError, match=r"smtp\.fallback\[0\]\.bogus: unknown key"):
        load_settings(None, {"smtp__fallback": [{"bogus": 1}]}, environ={})


def test_settings_with_domain_limits_stay_hashable_and_compare_their_limits() -> None:
    limited = {"limits__domains": {"gmail.com": {"rate": 20, "connections": 4}}}
    first, second = (load_settings(None, limited, environ={}) for _ in range(2))
    assert hash(first) == hash(second) and first == second
    assert first != load_settings(None, {"limits__domains": {"gmail.com": {"rate": 5}}}, environ={})


# -- in a daemon --------------------------------------------------------------------------


def enqueue(path: Path, to: list[str]) -> None:
    with Client(load_settings(path, environ={})) as client:
        for address in to:
            client.enqueue_email("welcome", to=address, context=CONTEXT)
        assert client.flush(10.0)


def test_smtp_rate_spaces_every_send_over_all_connections(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: Callable[..., InProcessDaemon]
) -> None:
    path = write_settings(tmp_path, smtp_server.port, smtp={"rate": 20, "connections": 4})
    run_daemon(path)
    enqueue(path, [f"u{i}@example.com" for i in range(31)])
    smtp_server.wait_for(1)
    first = time.monotonic()
    smtp_server.wait_for(31, timeout=30)
    took = time.monotonic() - first
    assert 1.35 <= took < 3.0, took  # 30 slots of 50 ms after the first (25/s: 1.2 s)


def test_a_limited_domain_does_not_slow_mail_to_other_domains(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: Callable[..., InProcessDaemon]
) -> None:
    path = write_settings(
        tmp_path, smtp_server.port, limits={"domains": {"slow.example": {"rate": 4}}}
    )
    run_daemon(path)
    enqueue(
        path, [f"s{i}@slow.example" for i in range(9)] + [f"f{i}@fast.example" for i in range(30)]
    )

    def fast() -> int:
        return sum(m.rcpt_tos[0].endswith("@fast.example") for m in smtp_server.messages)

    started = time.monotonic()
    smtp_server.wait_for(1)
    while fast() < 30:
        assert time.monotonic() - started < 20, smtp_server.messages
        time.sleep(0.02)
    slow_then = len(smtp_server.messages) - 30
    assert slow_then < 9  # the fast domain was done before the slow one (9 at 4/s: 2 s)
    smtp_server.wait_for(39, timeout=30)
    assert time.monotonic() - started >= 1.9


def test_a_stop_while_sends_wait_for_the_rate_gives_them_back_unsent(
    tmp_path: Path, smtp_server: SmtpServer, run_daemon: Callable[..., InProcessDaemon]
) -> None:
    path = write_settings(tmp_path, smtp_server.port, smtp={"rate": 0.5, "connections": 4})
    daemon = run_daemon(path)
    enqueue(path, [f"u{i}@example.com" for i in range(6)])
    smtp_server.wait_for(1)
    stopped = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - stopped < 1.9  # it did not wait for the next slot, 2 s later

    with SqliteReader(daemon.settings.spool.path) as spool:
        unsent = [spool.inspect(i) or {} for i in spool.waiting_ids()]
    assert len(unsent) + len(smtp_server.messages) == 6 and len(unsent) >= 4
    assert all(r["state"] == "queued" and r["attempts"] == 0 for r in unsent)
    assert not any(r["maybe_duplicate"] for r in unsent)  # nothing was on the wire for them
