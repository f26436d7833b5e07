"""Output directories: complete old or complete new at every instant, and a failed write loses nothing."""
from __future__ import annotations

import os
import threading

import pytest

from fedsea_hpc.components import outputs
from fedsea_hpc.components.outputs import save_atomically


def _write(version: int):
    def write(d: str) -> None:
        for i in range(20):  # several files: a half-written dir would show fewer, or mixed versions
            with open(os.path.join(d, f"part{i}"), "w") as f:
                f.write(str(version))
    return write


def _read(dest) -> set[str] | None:
    """The versions in one snapshot of ``dest`` (read through one directory handle, so a swap in
    the middle cannot mix two directories); ``{"partial"}`` if it lacks files; None if ``dest``
    is missing. A snapshot deleted while being read (the old one, after a swap) counts as None
    only if ``dest`` itself is gone."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        names = os.listdir(fd)
        if len(names) != 20:
            return {"old"} if _replaced(fd, dest) else {"partial"}
        out = set()
        for n in names:
            with open(os.open(n, os.O_RDONLY, dir_fd=fd)) as f:
                out.add(f.read())
        return out
    except FileNotFoundError:
        return {"old"}  # this snapshot is the replaced one, being deleted; dest has the new one
    finally:
        os.close(fd)


def _replaced(fd: int, dest) -> bool:
    """The directory behind ``fd`` is no longer the one at ``dest`` (swapped out, being deleted)."""
    try:
        return os.fstat(fd).st_ino != os.stat(dest).st_ino
    except FileNotFoundError:
        return False


def test_replacing_a_directory_never_shows_a_missing_or_mixed_one(tmp_path):
    dest = tmp_path / "adapters" / "client0"
    save_atomically(str(dest), _write(0))
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(_read(dest))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 200):
            save_atomically(str(dest), _write(v))
    finally:
        stop.set()
        t.join()
    assert seen, "the reader never ran"
    bad = [s for s in seen if s is None or len(s) != 1 or s == {"partial"}]
    assert sum(s != {"old"} for s in seen) > len(seen) // 2  # most reads saw a whole directory
    assert not bad, f"{len(bad)} of {len(seen)} reads saw no directory or a mixed one, e.g. {bad[0]}"
    assert _read(dest) == {"199"}
    assert sorted(os.listdir(dest.parent)) == ["client0"]  # no temp dirs left behind


def test_a_failed_write_keeps_the_previous_directory(tmp_path):
    dest = tmp_path / "out"
    save_atomically(str(dest), _write(1))

    def broken(d: str) -> None:
        _write(2)(d)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(str(dest), broken)
    assert _read(dest) == {"1"}
    assert os.listdir(tmp_path) == ["out"]


def test_without_the_exchange_the_fallback_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # e.g. a file system without it
    dest = tmp_path / "out"
    save_atomically(str(dest), _write(1))
    save_atomically(str(dest), _write(2))
    assert _read(dest) == {"2"}
    assert os.listdir(tmp_path) == ["out"]
