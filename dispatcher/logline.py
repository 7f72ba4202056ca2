"""The daemon's log: one line per record, stamped unless journald stamps it.

journald, `grep` and log shippers take each line for an event of its own, so a record that
spans lines (a relay's multi-line reply, a traceback) would split into entries without its
level or logger. Unless stderr is a terminal (`dispatcher dev` in front of a developer), its
line breaks are written as the two characters `\\n` instead. What Python itself would print to
stderr (a warning, a thread's or a finalizer's uncaught exception) goes through the same log.
"""

import logging
import os
import sys
import threading

log = logging.getLogger("dispatcher")


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose every record, traceback included, is one line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def log_format() -> str:
    """Under systemd (`JOURNAL_STREAM`), journald stamps every line itself: no second stamp."""
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    return f"{stamp}%(levelname)s %(name)s: %(message)s"


def configure(level: str | int) -> None:
    """Log records of `level` and above to stderr, Python's own reports too: one line each,
    unless a person reads them in a terminal."""
    handler = logging.StreamHandler()
    one_line = not (sys.stderr and sys.stderr.isatty())
    handler.setFormatter((OneLineFormatter if one_line else logging.Formatter)(log_format()))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)
    threading.excepthook = _thread_died
    sys.unraisablehook = _unraisable


def _thread_died(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    log.error("uncaught exception in thread %s", name, exc_info=args.exc_value)


def _unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    what = unraisable.err_msg or "Exception ignored in"
    log.error("%s: %r", what, unraisable.object, exc_info=unraisable.exc_value)
