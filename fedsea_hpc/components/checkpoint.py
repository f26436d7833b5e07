"""Checkpoints: written whole or not at all, and found again by ``run.resume``.

Layout under ``run.output_dir/checkpoints/``::

    step-00000010/
        client0.pt .. client{C-1}.pt  per client: trainable tensors by name, AdamW state dict,
                                      batches taken, noise generator and torch RNG states,
                                      the FedAvg sample counter
        server/ds/                    the server group's DeepSpeed engine (``save_checkpoint``,
                                      tag ``ds``, frozen base weights left out)
        server_full.pt                Part B consolidated: every trainable tensor's full fp32
                                      value and AdamW moments by HF/peft name (any ZeRO stage),
                                      for a resume on another server count or ZeRO stage
        server_rng{i}.pt              server rank i's torch RNG state
        metrics.jsonl                 every metrics row so far
        meta.json                     step, topology, partition, rebalance records, the config
        parts/rank<r>.json            size and CRC-32 of the files rank r wrote
        COMPLETE                      written last: step, byte size and CRC-32 of every file

A save (:mod:`fedsea_hpc.components.saving`) fills ``.tmp-step-XXXXXXXX``: at the step
boundary every rank snapshots its state into memory (training waits only for that) and a
background writer writes its files there, noting each file's size and CRC-32 in
``parts/rank<r>.json``. When every rank is done (a slot of the step's maxima all-reduce says
so), rank 0 writes ``COMPLETE`` and renames the directory into place: a ``step-*`` directory
is complete by construction, and an interrupted save leaves only a ``.tmp-*`` that
the next launch removes. A save that cannot write (a full disk, a quota) stops the job with one
line naming the directory; the previous checkpoint is untouched. Older complete checkpoints
beyond ``run.keep_checkpoints`` are deleted only after the new one is in place. The secure-aggregation keys are not saved: they are agreed
afresh by each launch (masks cancel in the sum, so the sums, and the losses, do not depend on them).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, replace

from fedsea_hpc.config import ConfigError
from fedsea_hpc.config.load import flat_keys

ROOT = "checkpoints"
MARKER = "COMPLETE"
META = "meta.json"
_NAME = re.compile(r"^step-(\d{8})$")
FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (the message names the file)."""


def root(output_dir: str) -> str:
    return os.path.join(output_dir, ROOT)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete(output_dir: str) -> list[tuple[int, str]]:
    """The complete checkpoints under ``output_dir``, oldest first: (step, path)."""
    base = root(output_dir)
    if not os.path.isdir(base):
        return []
    out = []
    for name in os.listdir(base):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(base, name, MARKER)):
            out.append((int(m.group(1)), os.path.join(base, name)))
    return sorted(out)


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, read and checked before the first collective."""

    path: str
    step: int
    meta: dict
    rows: tuple = ()  # metrics rows of steps 1..step
    sources: tuple = ()  # per client of this run: its client index in the checkpoint (run.resume_clients)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def splits(self) -> list[tuple[int, int]]:
        """(p, q) of every client of this run, as the checkpoint has them."""
        return [tuple(self.meta["splits"][s]) for s in self.sources]

    @property
    def silos(self) -> list[int]:
        """The data silo of every client of this run (its shard of a single file, its shuffle)."""
        silos = self.meta.get("silos", list(range(self.meta["clients"])))
        return [silos[s] for s in self.sources]

    @property
    def shards(self) -> int:
        """How many shards a single data.train_files file was cut into: the first run's clients."""
        return self.meta.get("shards", self.meta["clients"])

    @property
    def same_clients(self) -> bool:
        return list(self.sources) == list(range(self.meta["clients"]))


def crc32(path: str) -> int:
    """CRC-32 of a file (zlib, 16 MiB at a time): catches bit rot and torn copies, not tampering."""
    c = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            c = zlib.crc32(chunk, c)
    return c


def read(path: str) -> Resume:
    """Check that ``path`` is a complete checkpoint whose files are all there, at their sizes
    and CRC-32s (every rank reads them once; the same answer on every rank picks the same one)."""
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        raise CheckpointError(f"run.resume: {path}: not a directory; give off, auto or a checkpoint directory "
                              f"(run.output_dir/{ROOT}/step-*)")
    if not os.path.isfile(marker):
        raise CheckpointError(f"run.resume: {path}: no {MARKER} marker (an interrupted save?); give a complete "
                              f"checkpoint or auto")
    try:
        with open(marker) as f:
            mark = json.load(f)
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"run.resume: {path}: unreadable {MARKER} or {META} ({e})") from None
    if meta.get("format") != FORMAT or mark.get("step") != meta.get("step"):
        raise CheckpointError(f"run.resume: {os.path.join(path, META)}: not a fedsea-hpc checkpoint of format "
                              f"{FORMAT}")
    for name, want in mark.get("files", {}).items():
        f = os.path.join(path, name)
        if not os.path.isfile(f) or os.path.getsize(f) != want["bytes"]:
            raise CheckpointError(f"run.resume: {f}: missing or truncated (expected {want['bytes']} bytes)")
        if crc32(f) != want["crc32"]:
            raise CheckpointError(f"run.resume: {f}: corrupt (its CRC-32 differs from the one in {MARKER})")
    step = int(meta["step"])
    return Resume(path, step, meta, tuple(_rows(os.path.join(path, "metrics.jsonl"), step)))


def find(run) -> Resume | None:
    """What ``run.resume`` names: None (off, or auto with nothing to resume) or a checked checkpoint.
    ``auto`` skips a damaged checkpoint for the previous complete one, with a warning."""
    from fedsea_hpc.distributed.env import say

    if run.resume == "off":
        return None
    if run.resume != "auto":
        return read(run.resume)
    for _, path in reversed(complete(run.output_dir)):
        try:
            return read(path)
        except CheckpointError as e:
            say(f"fedsea: warning: {e}; trying the previous checkpoint")
    return None


def check_resume(res: Resume, cfg, launch_rank: int) -> Resume:
    """The resumed run must be able to continue: its clients among the checkpoint's, steps left to
    run. Returns ``res`` with ``sources`` set. Other changed keys are allowed (a new server count
    or ZeRO stage loads the consolidated Part B) and listed."""
    from fedsea_hpc.distributed.env import say

    meta = res.meta
    n, want = meta["clients"], cfg.topology.clients
    sources = list(cfg.run.resume_clients) or list(range(want))
    if not cfg.run.resume_clients and n != want:
        raise CheckpointError(f"run.resume_clients: the checkpoint {res.path} has {n} clients and "
                              f"topology.clients={want}; list which of its clients continue (e.g. "
                              f"run.resume_clients=[{','.join(map(str, range(want)))}])")
    if (len(sources) != want or len(set(sources)) != want
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < n for s in sources)):
        raise CheckpointError(f"run.resume_clients: must list {want} distinct client indices of the checkpoint "
                              f"(0..{n - 1}, one per client of this run, topology.clients={want}), got "
                              f"{cfg.run.resume_clients}")
    if res.step >= cfg.train.steps:
        raise CheckpointError(f"train.steps: the checkpoint {res.path} is at step {res.step}, nothing left to "
                              f"run with train.steps={cfg.train.steps}; raise train.steps or start fresh "
                              f"(run.resume=off)")
    if launch_rank == 0:
        changed = sorted(k for k, v in flat_keys(cfg.to_dict()).items()
                         if not k.startswith(("run.", "debug.")) and k != "train.steps"
                         and flat_keys(meta["config"]).get(k, v) != v)
        if changed:
            say(f"fedsea: warning: resuming {res.path} with changed keys: {', '.join(changed)}")
        if sources != list(range(n)):
            left = sorted(set(range(n)) - set(sources))
            say(f"fedsea: resuming {res.path} with clients {sources} of its {n}"
                + (f"; client(s) {left} left: their client-side state is dropped" if left else ""))
    return replace(res, sources=tuple(sources))


def size_bytes(path: str) -> int:
    """Bytes of every file under a checkpoint directory."""
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def tidy(out: str) -> None:
    """Rank 0 at start: clear what a crashed save left. ``.tmp-*`` go; a ``step-N.old`` (set
    aside while the same step was saved again) goes back into place if ``step-N`` is missing."""
    base = root(out)
    if not os.path.isdir(base):
        return
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".old"):
            if os.path.isdir(path[:-len(".old")]):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, path[:-len(".old")])


def consolidated_start(res: Resume | None, servers: int, zero_stage: int):
    """The server's starting state when the checkpoint was written by another layout (server
    count, ZeRO stage, or other clients, whose union of server spans may differ): the
    consolidated Part B as a :class:`~fedsea_hpc.adapt.migrate.Moved` (its own copies, nothing
    merged). None when DeepSpeed's own checkpoint fits (or no resume)."""
    if res is None or (res.meta["servers"] == servers and res.meta["zero_stage"] == zero_stage
                       and res.same_clients):
        return None
    import torch

    from fedsea_hpc.adapt.migrate import Moved

    path = res.file("server_full.pt")
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"run.resume: {path}: unreadable ({type(e).__name__}: {e})") from None
    return Moved(old=st["state"], merged={}, changed=set(), step=st["step"])


def _rows(path: str, step: int) -> list[dict]:
    """The metrics rows before the checkpoint (one per step, in order, and its eval passes)."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CheckpointError(f"run.resume: {path}: unreadable ({e})") from None
    if [r.get("step") for r in rows if "eval_loss" not in r] != list(range(1, step + 1)):
        raise CheckpointError(f"run.resume: {path}: expected one row for each of steps 1..{step}")
    return rows
