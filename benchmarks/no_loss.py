"""No-loss acceptance runs: the fault scenarios of issue 3 at full size, with their counts.

Run from the repository root, in the project's venv (with the test extra installed):

    python benchmarks/no_loss.py

1. 500 requests enqueued while no daemon runs, by a process that then exits at once: its
   slowest `enqueue_email()` call, how long the process took, then what a daemon started
   afterwards delivers.
2. 3,000 requests enqueued while the daemon is killed with SIGKILL twice and restarted.
3. 2,000 requests spread over two daemons, one killed with SIGKILL under load (and restarted
   at the end, to deliver what it had acknowledged).
Each prints enqueued, delivered, lost and duplicates, counted by request id at the SMTP server.
"""

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemon import DaemonProcess, write_settings  # noqa: E402
from tests.smtp_server import SmtpServer  # noqa: E402
from tests.test_no_loss import (  # noqa: E402
    kill_twice,
    stored_at_least,
    wait_for_all,
    wait_until,
)


def run_app(settings: Path, count: int, *options: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.app", str(settings), str(count), *options]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)


def finish(app: subprocess.Popen[bytes]) -> tuple[list[str], str]:
    """The ids the app enqueued, and its first and slowest later call times."""
    out, _ = app.communicate(timeout=300)
    lines = [orjson.loads(line) for line in out.splitlines()]
    ids = [i for line in lines for i in line["ids"]]
    first = max(line["first_call_seconds"] for line in lines) * 1000
    later = max(line["slowest_later_call_seconds"] for line in lines) * 1000
    return ids, f"first call {first:.1f} ms, slowest later call {later:.1f} ms"


def report(name: str, ids: list[str], smtp: SmtpServer, log: Callable[[], str]) -> None:
    seen = wait_for_all(smtp, ids, log)
    lost = len(set(ids) - set(seen))
    duplicates = sum(seen.values()) - len(seen)
    print(
        f"  {name:<40} enqueued {len(ids):5}  delivered {len(seen):5}  lost {lost}"
        f"  duplicates {duplicates}"
    )


def no_daemon(folder: Path, smtp: SmtpServer) -> None:
    settings = write_settings(folder, smtp.port)
    started = time.monotonic()
    ids, calls = finish(run_app(settings, 500))
    took = time.monotonic() - started
    files = len(list((folder / "overflow").iterdir()))
    print(
        f"  no daemon: {calls}; process done in {took:.2f} s"
        f" (interpreter start-up included); spill files {files}"
    )
    daemon = DaemonProcess(settings)
    try:
        report("500 enqueued with no daemon, then started", ids, smtp, lambda: daemon.log)
    finally:
        daemon.stop()


def killed_twice(folder: Path, smtp: SmtpServer) -> None:
    settings = write_settings(folder, smtp.port)
    daemon = DaemonProcess(settings)
    app = run_app(settings, 3000, "--pause-every", "20", "--flush", "60")
    daemon = kill_twice(daemon, DaemonProcess, smtp, stored=1000, sent=500)
    ids, calls = finish(app)
    try:
        report("3,000 with SIGKILL twice", ids, smtp, lambda: daemon.log)
    finally:
        daemon.stop()
    print(f"  (enqueue_email() in that run: {calls})")


def two_daemons(folder: Path, smtp: SmtpServer) -> None:
    daemons = []
    for name in ("a", "b"):
        (folder / name).mkdir()
        daemons.append(DaemonProcess(write_settings(folder / name, smtp.port)))
    app_settings = folder / "app.yaml"
    client = {
        "connect": [d.settings.intake.bind for d in daemons],
        "acks": [d.settings.intake.acks for d in daemons],
        "overflow_dir": str(folder / "b" / "overflow"),
    }
    app_settings.write_text(yaml.safe_dump({"client": client}))
    app = run_app(app_settings, 2000, "--pause-every", "20", "--flush", "60")
    for daemon in daemons:
        wait_until(partial(stored_at_least, daemon, 400), "a share each")
    daemons[0].kill()
    ids, _ = finish(app)
    daemons[0] = DaemonProcess(daemons[0].settings_path)
    try:
        report("2,000 over two daemons, one SIGKILLed", ids, smtp, lambda: daemons[1].log)
    finally:
        for daemon in daemons:
            daemon.stop()


def main() -> None:
    for scenario in (no_daemon, killed_twice, two_daemons):
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp, SmtpServer() as smtp:
            scenario(Path(tmp), smtp)


if __name__ == "__main__":
    main()
