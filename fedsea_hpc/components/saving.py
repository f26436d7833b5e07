"""Saving a checkpoint while training goes on: the snapshot, the background writer, the protocol.

:mod:`fedsea_hpc.components.checkpoint` owns the format (layout, ``COMPLETE``, ``meta.json``,
finding and checking a checkpoint to resume from); this module writes one. At a save's step
boundary every rank takes a :func:`snapshot` of its state into memory (training waits only for
that) and its :class:`Writer` writes the files in a background thread into the ``.tmp-*``
directory; :class:`Saver` decides when to save and, once no rank's writer is busy, has rank 0
write ``COMPLETE`` and rename the directory into place.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time

from fedsea_hpc.components.checkpoint import (
    FORMAT, MARKER, META, CheckpointError, complete, crc32, root, step_name, tidy,
)


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
