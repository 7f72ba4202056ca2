"""Relay acceptance runs: an outage, a wrong password, failover, and rate precision.

Run from the repository root, in the project's venv with the test extra installed:

    python benchmarks/outage.py [--mails 2000] [--outage 20] [--only outage,password,...]

Each case runs a real `dispatcher run` subprocess against aiosmtpd relays on 127.0.0.1 (this
process serves them), with `retry.attempts: 3`, `retry.backoff: [1, 4]`, `smtp.probe: [1, 4]`
and 8 connections, as a new user would set them:

1. outage: the relay greets every connection with `421` for `--outage` seconds while `--mails`
   requests wait; then it is healthy. Prints the connections the relay saw, the daemon's CPU
   and log lines during the outage, how long after the relay came back all were sent, and
   whether any was dead or delivered twice.
2. password: the relay refuses the login (535); the log lines, dead requests, what `dispatcher
   status` shows; then the password file is fixed and every request is sent.
3. failover: the primary greets with 421, a fallback is healthy: where the mail went; then the
   primary comes back and new mail goes where.
4. rate: `smtp.rate: 20` and 200 requests, timed from the first enqueue to the last `sent`;
   and 1,000 requests to other domains alone, then beside 100 to a domain limited to 10/s.
"""

import argparse
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import CONTEXT, wait_stored  # noqa: E402
from benchmarks.delivery import tree_cpu_seconds  # noqa: E402
from dispatcher.client import Client  # noqa: E402
from dispatcher.settings import load_settings  # noqa: E402
from dispatcher.spool.sqlite import SqliteReader  # noqa: E402
from tests.daemon import DaemonProcess, write_settings  # noqa: E402
from tests.relay_server import RelayServer  # noqa: E402
from tests.smtp_server import SmtpServer  # noqa: E402

REFUSE = "421 4.3.2 Service not available"
WAIT_LIMIT = 300.0  # seconds any wait may take before the run gives up


def settings(folder: Path, port: int, **smtp: Any) -> Path:
    return write_settings(
        folder,
        port,
        smtp={"connections": 8, "timeout": 10, "probe": [1, 4], **smtp},
        retry={"attempts": 3, "backoff": [1, 4], "max_age": 3600},
    )


def enqueue(path: Path, addresses: list[str]) -> None:
    with Client(load_settings(path, environ={})) as client:
        for address in addresses:
            client.enqueue_email("welcome", to=address, context=CONTEXT)
        if not client.flush(60.0):
            raise SystemExit("the daemon did not acknowledge every request")


def counts(path: Path) -> dict[str, int]:
    with SqliteReader(load_settings(path, environ={}).spool.path) as spool:
        return spool.counts()


def wait(condition: Callable[[], bool], what: str) -> float:
    """Bounded poll; returns the monotonic time it became true."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def once(*servers: SmtpServer) -> str:
    ids = Counter(m.message_id for server in servers for m in server.messages)
    twice = sum(1 for n in ids.values() if n > 1)
    return f"{len(ids)} distinct messages, {twice} delivered more than once"


def outage(folder: Path, mails: int, seconds: float) -> None:
    relay = RelayServer()
    relay.greeting = REFUSE
    relay.start()
    path = settings(folder, relay.port)
    daemon = DaemonProcess(path)
    try:
        enqueue(path, [f"user{i}@example.com" for i in range(mails)])
        wait_stored(daemon.settings.spool.path, mails)
        lines, accepted = len(daemon.lines), relay.accepted
        cpu, start = tree_cpu_seconds(daemon.process.pid), time.monotonic()
        time.sleep(seconds)
        cpu = tree_cpu_seconds(daemon.process.pid) - cpu
        during = time.monotonic() - start
        seen, logged = relay.accepted - accepted, daemon.lines[lines:]
        state = counts(path)
        relay.greeting = None
        back = time.monotonic()
        daemon.wait_for_log("up again", timeout=WAIT_LIMIT)
        found = time.monotonic()
        done = wait(lambda: counts(path)["sent"] + counts(path)["dead"] >= mails, "all sent")
        final = counts(path)
    finally:
        daemon.stop()
        relay.stop()
    print(f"outage: {mails} requests waiting, relay greeting {REFUSE!r} for {during:.1f} s")
    print(f"  connections the relay accepted during the outage: {seen} (before it: {accepted})")
    print(f"  daemon CPU during the outage: {cpu:.2f} s, {cpu / during:.1%} of a core")
    print(f"  log lines during the outage: {len(logged)}")
    for line in logged:
        print(f"    {line[:160]}")
    print(f"  at the end of the outage: {state['sent']} sent, {state['dead']} dead")
    print(
        f"  all {final['sent']} sent {done - back:.1f} s after the relay came back"
        f" (a probe found it up after {found - back:.1f} s, the drain took {done - found:.1f} s);"
    )
    print(f"  {final['dead']} dead; {once(relay)}")


def password(folder: Path) -> None:
    relay = RelayServer()
    relay.login = ("mailer", "the-right-one")
    relay.start()
    secret = folder / "password"
    secret.write_text("a-wrong-one\n")
    path = settings(folder, relay.port, username="mailer", password_file=str(secret))
    daemon = DaemonProcess(path)
    try:
        lines = len(daemon.lines)
        enqueue(path, [f"user{i}@example.com" for i in range(200)])
        daemon.wait_for_log("down: 535")
        time.sleep(5)
        logged, state = daemon.lines[lines:], counts(path)
        shown = subprocess.run(
            [sys.executable, "-m", "dispatcher", "status", "--settings", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        secret.write_text("the-right-one\n")
        fixed = time.monotonic()
        done = wait(lambda: counts(path)["sent"] >= 200, "all sent")
    finally:
        daemon.stop()
        relay.stop()
    print("password: the relay answers the login with 535; 200 requests")
    print(f"  log lines in the 5 s after: {len(logged)}; dead: {state['dead']}")
    for line in logged:
        print(f"    {line[:160]}")
    relays = shown[shown.index("relays:") :].splitlines()[:3] if "relays:" in shown else []
    print("  dispatcher status shows:", *(f"    {line}" for line in relays), sep="\n")
    print(f"  password file fixed: all 200 sent {done - fixed:.1f} s later; {once(relay)}")
    print(f"  the password in the log: {'a-wrong-one' in daemon.log}")


def failover(folder: Path) -> None:
    primary, fallback = RelayServer(), SmtpServer()
    primary.greeting = REFUSE
    primary.start()
    fallback.start()
    path = settings(folder, primary.port, fallback=[{"host": "127.0.0.1", "port": fallback.port}])
    daemon = DaemonProcess(path)
    try:
        enqueue(path, [f"user{i}@example.com" for i in range(500)])
        wait(lambda: counts(path)["sent"] >= 500, "500 sent")
        first = (len(primary.messages), len(fallback.messages), counts(path)["dead"])
        primary.greeting = None
        daemon.wait_for_log(f"relay 127.0.0.1:{primary.port} up again", timeout=30)
        enqueue(path, [f"later{i}@example.com" for i in range(200)])
        wait(lambda: counts(path)["sent"] >= 700, "700 sent")
        then = (len(primary.messages), len(fallback.messages), counts(path)["dead"])
    finally:
        daemon.stop()
        primary.stop()
        fallback.stop()
    print("failover: primary greets with 421, one fallback healthy")
    print(
        f"  500 requests: {first[0]} via the primary, {first[1]} via the fallback, {first[2]} dead"
    )
    print(
        f"  primary back, 200 more: {then[0] - first[0]} via the primary,"
        f" {then[1] - first[1]} via the fallback, {then[2]} dead; {once(primary, fallback)}"
    )


def timed(path: Path, port: int, addresses: list[str], counted: str = "") -> float:
    """Seconds from the first enqueue until every request not to domain `counted` was sent."""
    server = SmtpServer(port)
    server.start()
    daemon = DaemonProcess(path)
    wanted = sum(1 for a in addresses if not counted or not a.endswith(f"@{counted}"))

    def arrived() -> bool:
        mine = [m for m in server.messages if not counted or counted not in m.rcpt_tos[0]]
        return len(mine) >= wanted

    try:
        start = time.monotonic()
        enqueue(path, addresses)
        return wait(arrived, "the mail") - start
    finally:
        daemon.stop()
        server.stop()


def rate(folder: Path) -> None:
    port = SmtpServer().port
    for name in ("rate", "alone", "beside"):
        (folder / name).mkdir()
    took = timed(
        settings(folder / "rate", port, rate=20), port, [f"u{i}@x.example" for i in range(200)]
    )
    print(f"rate: smtp.rate 20, 200 requests: all sent in {took:.2f} s (9.95 s is exact)")
    others = [f"user{i}@other{i % 10}.example" for i in range(1000)]
    limited = [f"user{i}@slow.example" for i in range(100)]
    alone = timed(settings(folder / "alone", port), port, others)
    beside_path = write_settings(
        folder / "beside",
        port,
        smtp={"connections": 8, "timeout": 10, "probe": [1, 4]},
        limits={"domains": {"slow.example": {"rate": 10}}},
    )
    beside = timed(beside_path, port, limited + others, counted="slow.example")
    print(
        f"  1,000 requests to 10 other domains: all sent {alone:.2f} s after the first enqueue"
        f" alone, {beside:.2f} s beside 100 to slow.example at 10/s (enqueued first)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--only", default="outage,password,failover,rate")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # aiosmtpd warns about AUTH without TLS: loopback here
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="outage-", dir="/tmp") as tmp:
        folder = Path(tmp)
        cases: dict[str, Callable[[Path], None]] = {
            "outage": lambda f: outage(f, args.mails, args.outage),
            "password": password,
            "failover": failover,
            "rate": rate,
        }
        for name in args.only.split(","):
            (folder / name).mkdir()
            cases[name](folder / name)
            print(flush=True)


if __name__ == "__main__":
    main()
