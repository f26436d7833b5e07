"""``run.output_dir``: checked before any rank starts, and never silently destroyed.

:func:`check` runs with the other input checks (a file where the directory should be, a place
that cannot be written: exit 2 on every rank, nothing touched). :func:`make_room` runs on rank 0
once every rank has passed its checks and before any rank writes: an earlier run of the same job
in the directory is moved aside, never overwritten, unless ``run.overwrite=true``:

- ``train``: the whole directory becomes the first free numbered sibling ``DIR.1``, ``DIR.2``, ...
  (unless this run resumes a checkpoint inside it: then it is that run, continued);
- ``generate`` / ``eval``: they write beside a training run's outputs (its adapters are often
  what they read), so only their own earlier files move, into ``DIR/generate.1/`` or ``DIR/eval.1/``.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

from fedsea_hpc.config import ConfigError

# What each job writes into run.output_dir (glob patterns, relative to it).
OUTPUTS = {
    "train": ("config.yaml", "metrics.jsonl", "summary.json", "adapters", "checkpoints", "trace.json", "secagg",
              "wire"),
    "generate": ("generate_config.yaml", "generate_summary.json", "generations-client*.jsonl"),
    "eval": ("eval_config.yaml", "eval_summary.json", "eval_predictions-client*.jsonl"),
}
CONFIG_FILE = {"train": "config.yaml", "generate": "generate_config.yaml", "eval": "eval_config.yaml"}
ALLOWED = "a directory this user can create or write (it is created if missing)"


def check(path: str) -> None:
    """``run.output_dir`` must be, or be creatable as, a writable directory. Touches nothing."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"run.output_dir: must be a directory path, got {path!r}; allowed: {ALLOWED}")
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(p) and not os.path.isdir(p):
        raise ConfigError(f"run.output_dir: {path} is a file, not a directory; allowed: {ALLOWED}")
    ancestor = p
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"run.output_dir: {path} cannot be created: {ancestor} is a file; allowed: {ALLOWED}")
    try:  # os.access says yes to root on a read-only mount or /proc: try it (and leave nothing)
        os.rmdir(tempfile.mkdtemp(prefix=".fedsea-probe-", dir=ancestor))
    except OSError as e:
        what = "is not writable" if ancestor == p else f"cannot be created in {ancestor}"
        raise ConfigError(f"run.output_dir: {path} {what} ({e.strerror}); allowed: {ALLOWED}") from None


def earlier_outputs(path: str, job: str) -> list[str]:
    """The files and dirs of an earlier ``job`` in ``path`` (sorted; empty when none). An empty
    directory holds nothing to lose (e.g. ``checkpoints/`` made ready as a mount point): not counted."""
    found = {m for pat in OUTPUTS[job] for m in glob.glob(os.path.join(glob.escape(path), pat))}
    return sorted(m for m in found if not (os.path.isdir(m) and not os.listdir(m)))


def _free(base: str) -> str:
    n = 1
    while os.path.lexists(f"{base}.{n}"):
        n += 1
    return f"{base}.{n}"


def make_room(path: str, job: str, overwrite: bool, resuming_inside: bool = False) -> str | None:
    """Clear the way for ``job``'s outputs in ``path``: move an earlier run aside (returns where to)
    or, with ``overwrite``, delete its outputs (returns None). Rank 0 only, before any rank writes."""
    found = earlier_outputs(path, job)
    if not found or (job == "train" and resuming_inside):
        return None
    if overwrite:
        for f in found:
            shutil.rmtree(f) if os.path.isdir(f) and not os.path.islink(f) else os.remove(f)
        return None
    if job == "train":
        dest = _free(os.path.normpath(path))
        try:
            os.rename(path, dest)
        except OSError as e:  # a mount point, or another rename won the race: never delete instead
            raise ConfigError(f"run.output_dir: cannot move the earlier run in {path} aside to {dest} "
                              f"({e.strerror}); allowed: another run.output_dir, or run.overwrite=true") from e
        return dest
    dest = _free(os.path.join(path, job))
    os.makedirs(dest)
    for f in found:
        os.rename(f, os.path.join(dest, os.path.basename(f)))
    return dest


def is_inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return os.path.commonpath([child, parent]) == parent
