"""An application process for the no-loss tests: enqueues, optionally forks, then exits.

    python -m tests.app SETTINGS COUNT [--children N] [--pause-every K] [--flush SECONDS]

Prints one JSON line per process: the ids it enqueued, its first `enqueue_email()` call's time
and its slowest later call's.
A forked child exits through `sys.exit`, as a gunicorn worker does, so only the client's own
exit handling stands between its requests and loss.
"""

import argparse
import os
import sys
import time

import orjson

import dispatcher


def enqueue(count: int, tag: str, pause_every: int) -> None:
    ids, times = [], []
    for i in range(count):
        started = time.perf_counter()
        ids.append(
            dispatcher.enqueue_email(
                "welcome",
                to=f"{tag}-{i}@example.com",
                context={"name": f"{tag} {i}", "activate_url": f"https://example.com/{i}"},
            )
        )
        times.append(time.perf_counter() - started)
        if pause_every and i % pause_every == pause_every - 1:
            time.sleep(0.001)  # a steady stream rather than one burst
    line = {
        "pid": os.getpid(),
        "ids": ids,
        "first_call_seconds": times[0] if times else 0.0,  # includes loading the settings
        "slowest_later_call_seconds": max(times[1:], default=0.0),
    }
    sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("settings")
    parser.add_argument("count", type=int)
    parser.add_argument("--children", type=int, default=0)
    parser.add_argument("--pause-every", type=int, default=0)
    parser.add_argument("--flush", type=float, default=None)
    args = parser.parse_args()
    dispatcher.configure(args.settings)
    enqueue(args.count, "parent", args.pause_every)
    children = []
    for n in range(args.children):
        pid = os.fork()
        if pid == 0:
            enqueue(args.count, f"child{n}", args.pause_every)
            sys.exit(0)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    if args.flush is not None:
        dispatcher.flush(args.flush)


if __name__ == "__main__":
    main()
