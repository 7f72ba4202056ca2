"""The overflow folder: requests no daemon acknowledged in time, kept durably on disk.

A spill file holds one wire frame per line (compact JSON never contains a raw newline). It is
written under a temporary name, fsynced, then renamed, and the folder is fsynced, so a reader
only ever sees whole files and a file that was renamed survives a crash or power loss. Readers
(the daemon, or a client handing spilled requests over again) delete a file only once every
request in it is committed to a spool.
"""

import itertools
import os
import time
from collections.abc import Iterable
from pathlib import Path

SUFFIX = ".frames"
_sequence = itertools.count()


def spill(folder: Path, frames: Iterable[bytes], tag: str) -> Path | None:
    """Write `frames` durably as one new file; None when there is nothing to write.

    `tag` (the client id) keeps names unique across processes sharing the folder.
    """
    data = b"".join(frame + b"\n" for frame in frames)
    if not data:
        return None
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{tag}-{os.getpid()}-{next(_sequence)}{SUFFIX}"
    temporary = folder / f".{name}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    final = folder / name
    os.rename(temporary, final)
    _sync_folder(folder)
    return final


def waiting(folder: Path) -> list[Path]:
    """Spill files, oldest first (names start with the time they were written)."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []


def read(path: Path) -> list[bytes] | None:
    """The frames of a spill file; None when another reader already took it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return [line for line in data.split(b"\n") if line]


def remove(path: Path) -> None:
    """Delete a spill file whose requests are all committed somewhere.

    Not fsynced: should a power loss undo the unlink, the file is read again and the spool
    ignores the ids it already holds.
    """
    path.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Make a rename or unlink itself durable (POSIX: fsync the directory)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
