"""The overflow folder: requests no daemon acknowledged in time, kept durably on disk.

A spill file holds one wire frame per line (compact JSON never contains a raw newline). It is
written under a temporary name, fsynced, then renamed, and the folder is fsynced, so a reader
only ever sees whole files and a file that was renamed survives a crash or power loss. Readers
(the daemon, or a client handing spilled requests over again) delete a file only once every
request in it is committed to a spool.

Under CURVE a file starts with a seal line, `#hmac-sha256 <writer's public key> <mac>`: the
HMAC-SHA256 of the rest of the file under a key only the writer and the daemon can derive
(`dispatcher.curve.spill_mac_key`). A daemon with an allowlist sends only files sealed by an
allowed key and moves the others into `refused/`, where they are kept, never sent.
"""

import itertools
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".frames"
SEAL = b"#hmac-sha256"
REFUSED = "refused"  # the subfolder of files a daemon will not send
_sequence = itertools.count()


@dataclass(frozen=True, slots=True)
class Seal:
    """How a client signs its spill files: its CURVE public key (Z85) and the MAC key."""

    public_key: bytes
    mac_key: bytes

    def line(self, body: bytes) -> bytes:
        """The seal line that vouches for `body`, the rest of the file."""
        return b" ".join((SEAL, self.public_key, _mac(self.mac_key, body))) + b"\n"


@dataclass(frozen=True, slots=True)
class Spilled:
    """A spill file as read: its frames, and who sealed it (None when it has no seal line)."""

    frames: list[bytes]
    body: bytes  # what the seal's MAC covers: every byte after the seal line
    signer: bytes | None = None  # the Z85 public key the seal line names
    mac: bytes = b""

    def sealed_with(self, mac_key: bytes) -> bool:
        """Whether the seal's MAC is that of this content under `mac_key` (constant time)."""
        import hmac

        return self.signer is not None and hmac.compare_digest(self.mac, _mac(mac_key, self.body))


def spill(folder: Path, frames: Iterable[bytes], tag: str, seal: Seal | None = None) -> Path | None:
    """Write `frames` durably as one new file; None when there is nothing to write.

    `tag` (the client id) keeps names unique across processes sharing the folder; `seal`
    signs the file, for a daemon with a CURVE allowlist. Raises OSError (a full disk, a folder
    that cannot be made) after removing what it began to write.
    """
    data = b"".join(frame + b"\n" for frame in frames)
    if not data:
        return None
    if seal is not None:
        data = seal.line(data) + data
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{tag}-{os.getpid()}-{next(_sequence)}{SUFFIX}"
    temporary, final = folder / f".{name}.tmp", folder / name
    try:
        _write_synced(temporary, data)
        os.rename(temporary, final)
    except OSError:
        temporary.unlink(missing_ok=True)  # a half-written file would only take space
        raise
    _sync_folder(folder)
    return final


def check_writable(folder: Path) -> None:
    """Make `folder` if missing and create a file in it; raises OSError saying why it cannot."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    probe = folder / f".probe-{os.getpid()}-{next(_sequence)}.tmp"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


def waiting(folder: Path) -> list[Path]:
    """Spill files, oldest first (names start with the time they were written)."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        return []


def load(path: Path) -> Spilled | None:
    """A spill file and its seal; None when another reader already took it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    signer, mac = None, b""
    if data.startswith(SEAL + b" "):
        line, _, data = data.partition(b"\n")
        fields = line.split(b" ")
        if len(fields) == 3 and _is_key(fields[1]):
            signer, mac = fields[1], fields[2]
    return Spilled([line for line in data.split(b"\n") if line], data, signer, mac)


def read(path: Path) -> list[bytes] | None:
    """The frames of a spill file, without its seal; None when another reader took it."""
    spilled = load(path)
    return None if spilled is None else spilled.frames


def remove(path: Path) -> None:
    """Delete a spill file whose requests are all committed somewhere.

    Not fsynced: should a power loss undo the unlink, the file is read again and the spool
    ignores the ids it already holds.
    """
    path.unlink(missing_ok=True)


def set_aside(path: Path) -> Path:
    """Move a spill file that must not be sent into `refused/` beside it, kept for a person."""
    refused = path.parent / REFUSED
    refused.mkdir(mode=0o700, exist_ok=True)
    return path.rename(refused / path.name)


def refused_count(folder: Path) -> int | None:
    """How many spill files a daemon refused and kept in `folder/refused/`; None when that
    folder cannot be read (it is the daemon's, mode 0700)."""
    try:
        return len(waiting(folder / REFUSED))
    except OSError:
        return None


def _is_key(field: bytes) -> bool:
    """A Z85 public key's shape: 40 printable ASCII characters (safe to show in a log line)."""
    return len(field) == 40 and field.isascii() and field.decode().isprintable()


def _mac(key: bytes, body: bytes) -> bytes:
    """Imports hashlib here: only sealed files need it, and it costs `import dispatcher` ~4 ms
    (OpenSSL's start-up)."""
    import hashlib
    import hmac

    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def _write_synced(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    """Make a rename or unlink itself durable (POSIX: fsync the directory)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
