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

A save fills ``.tmp-step-XXXXXXXX``: at the step boundary every rank snapshots its state into
memory (training waits only for that) and a background :class:`Writer` writes its files there,
noting each file's size and CRC-32 in ``parts/rank<r>.json``. When every rank is done (a slot
of the step's maxima all-reduce says so), rank 0 writes ``COMPLETE`` and renames the directory
into place: a ``step-*``
directory is complete by construction, and an interrupted save leaves only a ``.tmp-*`` that
the next launch removes. A save that cannot write (a full disk, a quota) stops the job with one
line naming the directory; the previous checkpoint is untouched. Older complete checkpoints
beyond ``run.keep_checkpoints`` are deleted only after the new one is in place. The secure-aggregation keys are not saved: they are agreed
afresh by each launch (masks cancel in the sum, so the sums, and the losses, do not depend on them).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
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


def snapshot(obj):
    """A copy of ``obj`` whose tensors are CPU clones (dicts, lists and tuples rebuilt, other
    values shared): what training may go on changing after the snapshot is not in it."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict's factory)
        for k in out:
            out[k] = snapshot(out[k])
        return out
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Writer:
    """One per rank: writes a checkpoint's files in a background thread while training goes on.

    ``save`` takes a :func:`snapshot` at once (the only part a step waits for) and queues the
    ``torch.save``; each file's size and CRC-32 are noted as it is written, so rank 0 need not
    read the others' files back. The first failure is kept and raised by :meth:`check`."""

    def __init__(self):
        import queue
        import threading

        self.jobs: queue.Queue = queue.Queue()
        self.written: dict[str, dict] = {}  # path: {"bytes", "crc32"}
        self.error: tuple[BaseException, str, int] | None = None  # (exception, directory, step)
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="fedsea-checkpoint-writer", daemon=True)
        self.thread.start()

    def _put(self, fn, where: tuple[str, int]) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self.jobs.put((fn, where))

    def save(self, obj, path: str, where: tuple[str, int]) -> None:
        self._put(lambda s=snapshot(obj): self._torch_save(s, path), where)

    def text(self, text: str, path: str, where: tuple[str, int]) -> None:
        self._put(lambda: self._write_text(text, path), where)

    def call(self, fn, where: tuple[str, int]) -> None:
        self._put(fn, where)

    def _torch_save(self, obj, path: str) -> None:
        import torch

        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(obj, path)
        self._note(path)

    def _write_text(self, text: str, path: str) -> None:
        with open(path, "w") as f:
            f.write(text)
        self._note(path)

    def _note(self, path: str) -> None:
        self.written[path] = {"bytes": os.path.getsize(path), "crc32": crc32(path)}

    def _run(self) -> None:
        while True:
            fn, where = self.jobs.get()
            try:
                if self.error is None:
                    fn()
            except BaseException as e:  # noqa: BLE001 - kept for the main thread to raise
                self.error = (e, *where)
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def busy(self) -> bool:
        return not self._idle.is_set()

    def wait(self) -> float:
        """Block until every queued file is written; the seconds waited."""
        t0 = time.perf_counter()
        self._idle.wait()
        return time.perf_counter() - t0

    def check(self, out: str) -> None:
        if self.error is not None:
            e, tmp, step = self.error
            raise CheckpointError(_save_failed(e, tmp, step, out))


def first_attempt() -> bool:
    """True unless a launcher restarted this job (``FEDSEA_ATTEMPT`` > 0): debug faults fire once."""
    return os.environ.get("FEDSEA_ATTEMPT", "0") == "0"


class Saver:
    """One per rank: when to save and the protocol every rank follows (see the module docstring).

    A save is asynchronous: at the step boundary every rank snapshots its state into memory and
    queues the writes on its :class:`Writer`; training goes on while they are written. Each step's
    maxima all-reduce carries "my writer is busy" (:meth:`busy`); once no rank is busy, rank 0
    publishes the checkpoint (:meth:`boundary`). A save due while the previous one is still being
    written first waits for it and publishes it (so at most one snapshot is held), and so does
    the end of training or a stop (:meth:`finish`)."""

    def __init__(self, cfg, topo):
        self.every, self.keep, self.out = cfg.run.save_every, cfg.run.keep_checkpoints, cfg.run.output_dir
        self.topo = topo
        self.fail = cfg.debug.fail_save if cfg.debug.fail_rank == topo.rank and first_attempt() else -1
        self.writer = Writer()  # idle unless a save is due (or a signal asks for one)
        self.unpublished: list[tuple[int, str, str]] = []  # (step, tmp, final), oldest first
        self.waited_s = 0.0  # seconds the last save waited for the one before it
        self.published: dict[int, int] = {}  # checkpoint step: steps done when it was published
        self.slow_s = cfg.debug.slow_save_s
        if topo.rank == 0:
            tidy(self.out)

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0

    def busy(self) -> float:
        """1.0 while this rank still writes a checkpoint (a slot of the step's maxima), else 0.0."""
        self.writer.check(self.out)
        return float(self.writer.busy())

    def boundary(self, steps_done: int, anyone_busy: bool) -> None:
        """After the step's maxima all-reduce: publish what every rank has finished writing."""
        if self.unpublished and not anyone_busy:
            self._publish_all(steps_done)

    def save(self, steps_done: int, worker, meta: dict | None, rows: list[dict] | None) -> str:
        """Every rank: snapshot this rank's part and queue its files; rank 0 adds ``meta``/``rows``."""
        import torch.distributed as dist

        self.waited_s = self.finish(steps_done)  # the previous save may still be written somewhere
        base = root(self.out)
        tmp = os.path.join(base, f".tmp-{step_name(steps_done)}")
        final = os.path.join(base, step_name(steps_done))
        if self.topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save interrupted before
            os.makedirs(tmp)
        dist.barrier()
        where = (tmp, steps_done)
        if self.slow_s > 0:
            self.writer.call(lambda: time.sleep(self.slow_s), where)  # debug.slow_save_s (EMULATED)
        try:
            worker.save_checkpoint(tmp, self.writer, where)
        except (OSError, RuntimeError) as e:  # a full disk, a quota, a vanished mount: stop, keep the last good one
            raise CheckpointError(_save_failed(e, tmp, steps_done, self.out)) from None
        if self.topo.rank == 0:
            self.writer.text("".join(json.dumps(r) + "\n" for r in rows), os.path.join(tmp, "metrics.jsonl"), where)
            self.writer.text(json.dumps({"format": FORMAT, "step": steps_done, **meta}, indent=1),
                             os.path.join(tmp, META), where)
        if steps_done == self.fail:
            self.writer.call(lambda: _die_in_save(self.topo.rank, steps_done), where)
        self.writer.call(lambda: self._manifest(tmp), where)  # last: this rank's notes, for rank 0
        self.unpublished.append((steps_done, tmp, final))
        return final

    def finish(self, steps_done: int) -> float:
        """Every rank, before a save, at the end of training or a stop: wait for the unpublished
        writes and publish them; the seconds this rank waited."""
        import torch.distributed as dist

        if not self.unpublished:
            return 0.0
        waited = self.writer.wait()
        self.writer.check(self.out)
        dist.barrier()
        self._publish_all(steps_done)
        return waited

    def _publish_all(self, now: int) -> None:
        for steps_done, tmp, final in self.unpublished:
            if self.topo.rank == 0:
                try:
                    self._publish(tmp, final, steps_done)
                except OSError as e:
                    raise CheckpointError(_save_failed(e, tmp, steps_done, self.out)) from None
            self.published[steps_done] = now
        self.unpublished = []

    def _manifest(self, tmp: str) -> None:
        """Writer thread: ``parts/rank<r>.json``, the size and CRC-32 of every file this rank wrote."""
        mine = [p for p in self.writer.written if p.startswith(tmp + os.sep)]
        notes = {os.path.relpath(p, tmp): self.writer.written.pop(p) for p in mine}
        os.makedirs(os.path.join(tmp, "parts"), exist_ok=True)
        with open(os.path.join(tmp, "parts", f"rank{self.topo.rank}.json"), "w") as f:
            json.dump(notes, f)

    def _publish(self, tmp: str, final: str, steps_done: int) -> None:
        """Rank 0: the marker last, then the rename, then pruning. Sizes and CRC-32s come from
        the ranks' ``parts/`` notes, made as each file was written; a file without a note (one
        DeepSpeed writes itself) is read here."""
        notes = {}
        parts = os.path.join(tmp, "parts")
        for n in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
            with open(os.path.join(parts, n)) as f:
                notes.update(json.load(f))
        files = {}
        for d, _, names in os.walk(tmp):
            for n in names:
                full = os.path.join(d, n)
                rel = os.path.relpath(full, tmp)
                note = notes.get(rel)
                if note is None or note["bytes"] != os.path.getsize(full):
                    note = {"bytes": os.path.getsize(full), "crc32": crc32(full)}
                files[rel] = note
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"step": steps_done, "files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):  # the same step saved before (a resumed run): the new one wins
            aside = f"{final}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, final)
        for _, old in complete(self.out)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _die_in_save(rank: int, steps_done: int) -> None:
    print(f"[rank {rank}] debug.fail_save: exiting abruptly while saving after step {steps_done}", flush=True)
    os._exit(3)


def _save_failed(e: BaseException, tmp: str, steps_done: int, out: str) -> str:
    """One line for a failed save. torch.save reports a full disk as an opaque RuntimeError
    ('unexpected pos'), so the free space of the filesystem is checked to name the cause."""
    free = shutil.disk_usage(os.path.dirname(tmp)).free
    if free < 64 * 2**20:
        why = f"no space left on the device ({free / 2**20:.1f} MiB free)"
    else:
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0])
    prev = complete(out)
    kept = f"; the previous checkpoint {prev[-1][1]} is intact" if prev else ""
    return f"checkpoint after step {steps_done}: writing {tmp} failed: {why}{kept}; resume with run.resume=auto"


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
    """The metrics rows of the steps before the checkpoint (one per step, in order)."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CheckpointError(f"run.resume: {path}: unreadable ({e})") from None
    if [r.get("step") for r in rows] != list(range(1, step + 1)):
        raise CheckpointError(f"run.resume: {path}: expected one row for each of steps 1..{step}")
    return rows
