"""Owner-only files: the spool, key files and spill folders hold mail and secrets.

Created private from the first byte (a restrictive umask around the creation), never created
readable and chmod-ed afterwards, which would leave a window in which another user can open them.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

OWNER_ONLY_UMASK = 0o077


@contextmanager
def owner_only() -> Iterator[None]:
    """Files and folders created inside are readable by their owner only.

    The umask is process-wide: use this around short file-creating calls only (the daemon
    does so at start-up, before any thread that creates files exists).
    """
    previous = os.umask(OWNER_ONLY_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as mode 0700; an existing folder is left as it is."""
    with owner_only():
        path.mkdir(parents=True, exist_ok=True)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty as mode 0600 unless it exists; SQLite then gives its -wal and -shm
    files the same mode as the database file."""
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return path
