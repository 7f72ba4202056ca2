"""Real small file systems for the disk-full tests: a tmpfs of a chosen size, and a filler."""

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SmallDisk = Callable[[int], Path]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """Factory: a fresh file system of `size` bytes (tmpfs), unmounted after the test; skips
    the test where this process may not mount one (not root; CI runs as root)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode:
            pytest.skip("needs a small file system: run as root to mount a tmpfs")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its file system has no space left; returns the file
    (delete it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for _ in range(100_000):  # bounded: 400 MB, far more than any disk of these tests
            try:
                out.write(b"x" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler
    raise AssertionError(f"{folder} never filled up")
