"""Captured mail for `dispatcher dev`: a folder of `.eml` files that the preview lists newest first.

Plain files rather than a database: a captured message can be opened in any mail client, the
folder survives restarts, and "delete everything" is `rm`. Each message is two files written by
rename (so a reader never sees half of one): `ID.json` with the SMTP envelope, then `ID.eml`
with the bytes exactly as received. The ID is the arrival time in nanoseconds, so names sort in
arrival order.
"""

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LISTED = 200  # newest messages the Outbox page shows; older ones stay on disk
_ID = re.compile(r"^[0-9]{19,24}$")


@dataclass(frozen=True, slots=True)
class Captured:
    """One message the capture server accepted."""

    id: str
    envelope_from: str
    recipients: tuple[str, ...]
    received_at: float  # Unix time
    data: bytes


class Outbox:
    """The capture folder: written by the dev SMTP server, read by the preview UI."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def add(self, envelope_from: str, recipients: list[str], data: bytes) -> str:
        """File one received message; returns its id."""
        self.folder.mkdir(parents=True, exist_ok=True)
        moment = time.time_ns()
        message_id = f"{moment:019d}"
        while (self.folder / f"{message_id}.eml").exists():  # two arrivals in one nanosecond
            moment += 1
            message_id = f"{moment:019d}"
        envelope = {"from": envelope_from, "to": recipients, "received_at": moment / 1e9}
        self._write(f"{message_id}.json", json.dumps(envelope).encode())
        self._write(f"{message_id}.eml", data)  # last: its presence makes the message visible
        return message_id

    def ids(self) -> list[str]:
        """Message ids, newest first, at most LISTED of them."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        ids = [name[:-4] for name in names if name.endswith(".eml") and _ID.match(name[:-4])]
        return sorted(ids, reverse=True)[:LISTED]

    def get(self, message_id: str) -> Captured | None:
        """The message, or None for an id that is malformed or not (or no longer) on disk."""
        if not _ID.match(message_id):
            return None
        try:
            data = (self.folder / f"{message_id}.eml").read_bytes()
            envelope: dict[str, Any] = json.loads((self.folder / f"{message_id}.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return Captured(
            id=message_id,
            envelope_from=str(envelope.get("from", "")),
            recipients=tuple(str(r) for r in envelope.get("to", [])),
            received_at=float(envelope.get("received_at", int(message_id) / 1e9)),
            data=data,
        )

    def version(self) -> str:
        """Changes whenever a message arrives or is deleted: part of the live-refresh token."""
        ids = self.ids()
        return f"{len(ids)}:{ids[0] if ids else '-'}"

    def _write(self, name: str, data: bytes) -> None:
        partial = self.folder / f".{name}.partial"
        partial.write_bytes(data)
        partial.replace(self.folder / name)
