"""A web app's signup endpoint three ways, under a real WSGI server, in one run.

    pip install -e '.[test,bench]'       # gunicorn and flask; `apt-get install wrk` for the
    python benchmarks/webapp.py           # closed-loop run (else a Python generator does it)
        [--rate 200] [--seconds 10] [--rounds 3] [--workers 4] [--delay 0.05] [--daemon-nice 0]

gunicorn (`--workers` sync workers) serves a Flask app whose `GET /signup` does, in turn:

- `none`: no mail, the yardstick;
- `enqueue`: `enqueue_email("welcome", ...)` to a `dispatcher run` daemon on this machine,
  which delivers to a relay answering each DATA after `--delay` seconds (slow_smtp.py);
- `direct`: smtplib sends a message straight to that relay (a new connection per mail, as
  Django's SMTP backend does).

For each: an open-loop load at `--rate` requests/s for `--seconds` (latency from the time a
request was due, so a server that falls behind is not hidden), p50/p99 and errors; then a
closed-loop run for the most requests/s (wrk with 16 connections, or a Python generator when
wrk is missing). The modes take turns for `--rounds` rounds and the medians are reported, and
every run starts with the daemon idle (the mail of the run before delivered). The daemon, the
relay, the WSGI server and the load generator share the machine's cores, as they would on one
small host. Every socket is on 127.0.0.1.
"""

import argparse
import asyncio
import os
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from flask import Flask, request

HERE = Path(__file__).resolve().parent
MODES = ("none", "enqueue", "direct")
REQUEST_TIMEOUT = 10.0  # seconds an open-loop request may take before it counts as an error
CLOSED_CONNECTIONS = 16

# -- the app gunicorn serves (`webapp:app`, in each worker) ---------------------------------

MODE = os.environ.get("WEBAPP_MODE", "none")
RELAY_PORT = int(os.environ.get("WEBAPP_RELAY_PORT", "0"))
app = Flask(__name__)
if MODE == "enqueue":
    import dispatcher

    dispatcher.configure()  # DISPATCHER_SETTINGS, at boot: the first request pays nothing


@app.get("/signup")
def signup() -> str:
    """What a signup does besides its database write: send the welcome mail, or not."""
    email = request.args.get("email", "ada@example.com")
    name = request.args.get("name", "Ada")
    if MODE == "enqueue":
        dispatcher.enqueue_email(
            "welcome",
            to=email,
            context={"name": name, "activate_url": f"https://example.com/activate/{name}"},
        )
    elif MODE == "direct":
        message = EmailMessage()
        message["From"], message["To"] = "Example <noreply@example.com>", email
        message["Subject"] = f"Welcome to Example, {name}!"
        message.set_content(f"Welcome, {name}!\n\nhttps://example.com/activate/{name}\n")
        with smtplib.SMTP("127.0.0.1", RELAY_PORT, timeout=30) as relay:
            relay.send_message(message)
    return "ok\n"


# -- the harness -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenLoop:
    p50_ms: float
    p99_ms: float
    errors: int
    offered: int


@dataclass(frozen=True)
class ClosedLoop:
    rps: float
    errors: int


@contextmanager
def process(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Path]:
    """A child process logging to `log` (a pipe nobody reads would block it), ended with
    SIGTERM (then SIGKILL) when the block ends."""
    with log.open("w") as out:
        child = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=out,
            # A process group of its own, so gunicorn's workers end with it, but not a session:
            # Linux shares CPU between sessions first (autogroups), and a daemon in a session
            # of its own would bring its own share instead of taking from the app's.
            process_group=0,
        )
    try:
        yield log
    finally:
        with_group = child.pid
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(with_group, sig)
                child.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def wait_idle(spool_path: Path, timeout: float = 600.0) -> None:
    """Bounded poll until the daemon's spool holds nothing queued, to retry or being sent."""
    from dispatcher.spool.sqlite import SqliteReader

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not spool_path.exists():
            return
        with SqliteReader(spool_path) as spool:
            counts = spool.counts()
        if counts["queued"] + counts["retry"] + counts["sending"] == 0:
            return
        time.sleep(0.5)
    raise SystemExit(f"the daemon still has mail to send after {timeout} s: {counts}")


def wait_for_line(log: Path, text: str, timeout: float = 30.0) -> None:
    """Bounded poll of a child's log until it holds `text` (it says it is ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        time.sleep(0.05)
    raise SystemExit(f"no line with {text!r} within {timeout} s:\n{log.read_text()}")


async def get(port: int, path: str, due: float) -> float | None:
    """One request on a new connection; seconds from `due` to the whole reply, None if it
    failed (refused, reset, not 200, or over REQUEST_TIMEOUT)."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
            )
            reply = await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return None
    return time.perf_counter() - due if reply.startswith(b"HTTP/1.1 200") else None


async def open_loop(port: int, rate: float, seconds: float) -> list[float | None]:
    """`rate` requests/s whatever the replies do: each is sent when due, on its own task."""
    count = int(rate * seconds)
    start = time.perf_counter() + 0.05
    tasks = []
    for index in range(count):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        path = f"/signup?email=user{index}@example.com&name=User{index}"
        tasks.append(asyncio.create_task(get(port, path, due)))
    return list(await asyncio.gather(*tasks))


async def closed_loop_python(port: int, seconds: float) -> tuple[float, int]:
    """CLOSED_CONNECTIONS clients, each sending its next request when the last replied."""
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def client(number: int) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            latency = await get(port, f"/signup?email=c{number}@example.com", time.perf_counter())
            if latency is None:
                errors += 1
            else:
                done += 1

    await asyncio.gather(*(client(n) for n in range(CLOSED_CONNECTIONS)))
    return done / seconds, errors


def closed_loop(port: int, seconds: float) -> tuple[float, int]:
    """Most requests/s: wrk when installed (C, keeps its own CPU small), else Python."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return asyncio.run(closed_loop_python(port, seconds))
    url = f"http://127.0.0.1:{port}/signup?email=wrk@example.com&name=Wrk"
    out = subprocess.run(
        [wrk, "-t1", f"-c{CLOSED_CONNECTIONS}", f"-d{int(seconds)}s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read \d+, write (\d+), timeout (\d+)", out
    )
    errors = int(non_2xx[1]) if non_2xx else 0
    if socket_errors:  # a sync worker closing its connection is a `read` error: not counted
        errors += sum(int(n) for n in socket_errors.groups())
    return float(rate[1]), errors


@contextmanager
def server(mode: str, args: argparse.Namespace, env: dict[str, str], log: Path) -> Iterator[int]:
    """gunicorn serving `mode` on a port of its own; yields the port once it answers and the
    daemon is idle (delivering the last run's mail would load the next run's machine)."""
    from benchmarks.common import wait_for_port  # the driver's: gunicorn's workers import no more
    from tests.smtp_server import free_port

    wait_idle(Path(env["WEBAPP_SPOOL"]))
    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn", "--workers", str(args.workers), "--worker-class", "sync",
        "--bind", f"127.0.0.1:{port}", "--pythonpath", str(HERE), "--log-level", "warning",
        "--backlog", "2048", "webapp:app",
    ]  # fmt: skip
    with process(command, log, {**env, "WEBAPP_MODE": mode}):
        wait_for_port(port)
        yield port


def measure_open(mode: str, args: argparse.Namespace, env: dict[str, str], log: Path) -> OpenLoop:
    """The open loop, on a server of its own: an overloaded one (direct) is still working off
    its backlog long after the loop ended."""
    with server(mode, args, env, log) as port:
        asyncio.run(open_loop(port, args.rate, 1.0))  # warm-up: every worker has served
        results = asyncio.run(open_loop(port, args.rate, args.seconds))
    latencies = sorted(r for r in results if r is not None)
    if len(latencies) < 2:
        return OpenLoop(float("nan"), float("nan"), len(results) - len(latencies), len(results))
    return OpenLoop(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=statistics.quantiles(latencies, n=100)[98] * 1000,
        errors=len(results) - len(latencies),
        offered=len(results),
    )


def measure_closed(
    mode: str, args: argparse.Namespace, env: dict[str, str], log: Path
) -> ClosedLoop:
    with server(mode, args, env, log) as port:
        asyncio.run(open_loop(port, 20, 1.0))  # warm-up
        return ClosedLoop(*closed_loop(port, args.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--delay", type=float, default=0.05, help="the relay's seconds per DATA")
    parser.add_argument(
        "--daemon-nice", type=int, default=0, help="run the daemon at this niceness (0-19)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="which of none,enqueue,direct")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every mode, in turn")
    args = parser.parse_args()

    sys.path.append(str(HERE.parent))  # after PYTHONPATH: a base checkout's package wins
    import dispatcher
    from benchmarks.common import wait_for_port
    from tests.daemon import write_settings
    from tests.smtp_server import free_port

    relay_port = free_port()
    opened: dict[str, list[OpenLoop]] = {mode: [] for mode in args.modes.split(",")}
    closed: dict[str, list[ClosedLoop]] = {mode: [] for mode in opened}
    with tempfile.TemporaryDirectory(prefix="webapp-") as name:
        folder = Path(name)
        settings = write_settings(folder, relay_port, smtp={"connections": 64})
        env = {
            "DISPATCHER_SETTINGS": str(settings),
            "WEBAPP_RELAY_PORT": str(relay_port),
            "WEBAPP_SPOOL": str(folder / "spool.sqlite3"),
        }
        relay = [sys.executable, str(HERE / "slow_smtp.py"), str(relay_port), str(args.delay)]
        daemon = ["nice", "-n", str(args.daemon_nice), sys.executable, "-m", "dispatcher", "run"]
        with (
            process(relay, folder / "relay.log"),
            process([*daemon, "--settings", str(settings)], folder / "daemon.log") as daemon_log,
        ):
            wait_for_port(relay_port)
            wait_for_line(daemon_log, "listening on")
            # Round after round, the modes in turn: a machine whose load changes (a shared
            # one) shifts every mode alike, and the median of the rounds is reported.
            for round_ in range(args.rounds):
                for mode in opened:
                    log = folder / f"gunicorn-{mode}-{round_}.log"
                    opened[mode].append(measure_open(mode, args, env, log))
                    closed[mode].append(measure_closed(mode, args, env, log))
                    print(f"  {mode}: {opened[mode][-1]} {closed[mode][-1]}", file=sys.stderr)

    print(f"dispatcher from {Path(dispatcher.__file__).parent}")
    print(
        f"gunicorn {args.workers} sync workers, Flask; relay answers DATA after"
        f" {args.delay * 1000:.0f} ms;"
        f" open loop {args.rate:.0f} req/s for {args.seconds:.0f} s; closed loop"
        f" {'wrk' if shutil.which('wrk') else 'Python'}, {CLOSED_CONNECTIONS} connections;"
        f" daemon nice {args.daemon_nice}"
    )
    print(f"medians of {args.rounds} rounds (each figure's range in brackets)")
    print(f"{'mode':8} {'p50 ms':>8} {'p99 ms [range]':>20} {'errors':>9}", end="")
    print(f" {'max req/s [range]':>20} {'vs none':>8}")
    rps = {mode: median([c.rps for c in runs]) for mode, runs in closed.items()}
    p99 = {mode: median([o.p99_ms for o in runs]) for mode, runs in opened.items()}
    for mode, runs in opened.items():
        errors = sum(o.errors for o in runs)
        offered = sum(o.offered for o in runs)
        share = f"{rps[mode] / rps['none']:.0%}" if "none" in rps else "-"
        print(
            f"{mode:8} {median([o.p50_ms for o in runs]):8.1f}"
            f" {p99[mode]:8.1f} {spread([o.p99_ms for o in runs]):>11}"
            f" {errors:>4}/{offered:<4}"
            f" {rps[mode]:8.0f} {spread([c.rps for c in closed[mode]]):>11}"
            f" {share:>8}"
        )
    if "none" in p99 and "enqueue" in p99:
        print(f"enqueue p99 / none p99: {p99['enqueue'] / p99['none']:.2f}x (target <= 1.2x)")
    if "none" in rps and "enqueue" in rps:
        print(f"enqueue max req/s / none: {rps['enqueue'] / rps['none']:.0%} (target >= 70%)")
    if "none" in rps and rps.get("direct"):
        print(f"none max req/s / direct: {rps['none'] / rps['direct']:.0f}x (target >= 20x)")


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"[{min(values):.0f}-{max(values):.0f}]"


if __name__ == "__main__":
    main()
