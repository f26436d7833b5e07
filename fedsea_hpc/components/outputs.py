"""Files a run leaves behind, written so that a reader never sees a half-written one.

A file is written beside its destination and renamed over it. A directory is filled beside its
destination and then swapped in: when the destination already exists the two are exchanged in
one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; ext4, xfs, btrfs, tmpfs and others), so
at every instant the destination holds either the complete old or the complete new content and
never nothing. Where the file system refuses the exchange (some network file systems) the old
directory is renamed aside first, which leaves a window of a few microseconds with no directory;
that fallback is taken only after the exchange failed.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from typing import Callable

import yaml

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the paths ``a`` and ``b``; False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def replace_dir(src: str, dest: str) -> None:
    """Put complete directory ``src`` at ``dest`` (same file system), replacing what was there."""
    if not os.path.lexists(dest):
        try:
            os.rename(src, dest)
            return
        except OSError as e:  # another writer created dest meanwhile: swap with it below
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(src, dest):
        shutil.rmtree(src)  # now holds the old content
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old.", dir=os.path.dirname(os.path.abspath(dest)))
    os.rename(dest, os.path.join(aside, "old"))
    os.rename(src, dest)
    shutil.rmtree(aside)


def save_atomically(dest: str, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary directory beside ``dest``, then swap it into place."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=parent)
    try:
        write(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: str, obj) -> None:
    write_text_atomically(path, yaml.safe_dump(obj, sort_keys=False))
