"""The daemon's log: one line per record, stamped unless journald stamps it.

journald, `grep` and log shippers take each line for an event of its own, so a record that
spans lines (a relay's multi-line reply, a traceback) would split into entries without its
level or logger. Its line breaks are written as the two characters `\\n` instead.
"""

import logging
import os


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose every record, traceback included, is one line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def log_format() -> str:
    """Under systemd (`JOURNAL_STREAM`), journald stamps every line itself: no second stamp."""
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    return f"{stamp}%(levelname)s %(name)s: %(message)s"


def configure(level: str) -> None:
    """Log records of `level` and above to stderr, one line each."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(log_format()))
    logging.basicConfig(level=level, handlers=[handler])
