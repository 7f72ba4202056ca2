"""Startup benchmark: what `import dispatcher` and the first `enqueue_email()` cost a process.

Run from the repository root, in the project's venv:

    python benchmarks/startup.py [--runs 30]

Each run starts three fresh interpreters, in turn: a bare one (`pass`), one that imports
`dispatcher`, and one that imports it and then times its first `enqueue_email()` without
`configure()` (settings found as `settings.yaml` in its working folder, no daemon running: the
request waits in the client, which is what a web app's first request meets). The figures are
medians of wall time, the import as the difference to the bare interpreter of the same run.
Bytecode is cached (in a temporary `PYTHONPYCACHEPREFIX`) as an installed package would have it.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGET_IMPORT_MS = 60.0  # `import dispatcher` over a bare interpreter
TARGET_FIRST_CALL_MS = 5.0  # the first `enqueue_email()` without `configure()`

FIRST_CALL = """
import time
import dispatcher
started = time.perf_counter()
dispatcher.enqueue_email("welcome", to="ada@example.com", context={"name": "Ada"})
print(time.perf_counter() - started)
import os
os._exit(0)  # no exit wait: the request has nowhere to go
"""


def wall(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Seconds from spawn to exit of one interpreter, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(ROOT / "settings.yaml", folder / "settings.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
        env["PYTHONPATH"] = str(ROOT)
        python = [sys.executable, "-c"]
        wall([*python, FIRST_CALL], env, folder)  # writes the bytecode cache
        bare, imported, first_calls = [], [], []
        for _ in range(args.runs):
            bare.append(wall([*python, "pass"], env, folder)[0])
            imported.append(wall([*python, "import dispatcher"], env, folder)[0])
            first_calls.append(float(wall([*python, FIRST_CALL], env, folder)[1]))
    bare_ms = statistics.median(bare) * 1e3
    import_ms = statistics.median(imported) * 1e3
    first_ms = statistics.median(first_calls) * 1e3
    print(f"{args.runs} runs each, medians of wall time, {os.cpu_count()} cores")
    print(f"  bare interpreter            {bare_ms:7.1f} ms")
    print(
        f"  import dispatcher           {import_ms:7.1f} ms  = bare + {import_ms - bare_ms:.1f} ms"
        f" ({import_ms / bare_ms:.2f}x; target: + {TARGET_IMPORT_MS:.0f} ms at most)"
    )
    print(
        f"  first enqueue_email()       {first_ms:7.1f} ms  (target: {TARGET_FIRST_CALL_MS:.0f} ms"
        " at most; no configure(), settings.yaml found)"
    )


if __name__ == "__main__":
    main()
