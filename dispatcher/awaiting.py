"""The requests a client handed over and awaits receipts for, oldest send first.

Kept in dicts of bytes and floats, with no tuple or object per request: every such object
counts as an allocation to the garbage collector until its receipt frees it, and with thousands
awaiting theirs, a caller sending as fast as it can paid for frequent collections, and now and
then for a full one: the slowest call of `benchmarks/enqueue.py`.
"""

from pathlib import Path


class Awaiting:
    """Requests handed over and not yet acknowledged (the caller holds `Handoff.lock`)."""

    def __init__(self) -> None:
        self.frames: dict[str, bytes] = {}  # request id -> its frame, oldest send first
        self.sent_at: dict[str, float] = {}  # the same ids -> time.monotonic() of the last send
        self.resent: set[str] = set()  # sent twice: spilled at the next timeout, not sent again
        self.from_files: dict[str, Path] = {}  # read back from this spill file: durable already
        self.files: dict[Path, int] = {}  # spill file -> its requests still awaited

    def __len__(self) -> int:
        return len(self.frames)

    def add(
        self,
        request_id: str,
        frame: bytes,
        at: float,
        *,
        resent: bool = False,
        source: Path | None = None,
    ) -> None:
        """A request just sent: awaited, as the youngest. `resent`: this was its second send;
        `source`: the spill file it was read back from."""
        self.frames[request_id] = frame
        self.sent_at[request_id] = at
        if resent:
            self.resent.add(request_id)
        if source is not None and request_id not in self.from_files:
            self.from_files[request_id] = source
            self.files[source] = self.files.get(source, 0) + 1

    def acknowledge(self, request_id: str) -> Path | None:
        """Its receipt came: no longer awaited. Returns its spill file once no request of that
        file is awaited any more (the file can go), else None."""
        if self.frames.pop(request_id, None) is None:
            return None  # a second receipt, or one for a request no longer awaited
        del self.sent_at[request_id]
        if self.resent:
            self.resent.discard(request_id)
        source = self.from_files.pop(request_id, None) if self.from_files else None
        if source is None or source not in self.files:
            return None
        self.files[source] -= 1
        if self.files[source]:
            return None
        del self.files[source]
        return source

    def late(self, now: float, timeout: float) -> list[str]:
        """The ids last sent `timeout` seconds or more before `now`, oldest first."""
        ids = []
        for request_id, sent_at in self.sent_at.items():
            if sent_at + timeout > now:
                break  # oldest first: the rest are younger
            ids.append(request_id)
        return ids

    def take_late(
        self, now: float, timeout: float
    ) -> tuple[list[tuple[str, bytes, bool]], set[Path]]:
        """Stop awaiting what had no receipt within `timeout`: this process's own requests
        (id, frame, whether sent twice already), and the spill files abandoned because one of
        their requests was late (each file whole: it is handed over again later)."""
        own: list[tuple[str, bytes, bool]] = []
        files: set[Path] = set()
        for request_id in self.late(now, timeout):
            source = self.from_files.get(request_id)
            if source is not None:
                files.add(source)
                self.abandon(source)
            elif request_id in self.frames:  # else abandoned with its spill file just now
                own.append((request_id, *self.remove(request_id)))
        return own, files

    def oldest_sent_at(self) -> float | None:
        return next(iter(self.sent_at.values()), None)

    def remove(self, request_id: str) -> tuple[bytes, bool]:
        """Stop awaiting a request of this process's own (not from a spill file) without its
        receipt: its frame, and whether it was sent twice already."""
        frame = self.frames.pop(request_id)
        del self.sent_at[request_id]
        resent = request_id in self.resent
        self.resent.discard(request_id)
        return frame, resent

    def abandon(self, source: Path) -> None:
        """Stop awaiting every request of a spill file: the file stays, to be handed over
        again later, and a late receipt for one of them no longer counts toward removing it."""
        del self.files[source]
        for request_id in [rid for rid, path in self.from_files.items() if path == source]:
            del self.from_files[request_id]
            self.remove(request_id)

    def own(self) -> int:
        """Awaited requests held in this process's memory only (not from a spill file)."""
        return len(self.frames) - len(self.from_files)

    def take_own(self) -> list[bytes]:
        """Stop awaiting the requests not from a spill file; their frames."""
        own = [rid for rid in self.frames if rid not in self.from_files]
        return [self.remove(request_id)[0] for request_id in own]
