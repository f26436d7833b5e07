"""``run.trace=true``: one Chrome-trace / Perfetto timeline of a training job, every rank in it.

Each rank records what its main thread does during the training steps: compute per part
(``A forward``, ``C forward+loss+backward``, ``A backward``, ``B forward``, ``B backward``), the
optimizer and DeepSpeed steps, FedAvg/FedSGD, every message (posting a send or a receive, and
waiting for one to complete, with kind, bytes, peer and the per-peer sequence number), and every
collective. At the end rank 0 gathers the events (:func:`gather`) and writes ``run.output_dir/trace.json``
(Trace Event Format: ``{"traceEvents": [...]}``): one process track per rank, named by its role,
a flow arrow from each send to the receive that took it.

One clock: every rank takes t = 0 when it leaves a barrier just before the first traced step
(``dist.barrier``), and times events with ``time.perf_counter_ns`` from there. On one node the
ranks also share the wall clock; ``otherData.clock.barrier_exit_spread_us`` is how far apart the
ranks left that barrier by it (the alignment error, a few microseconds to a millisecond).

Every event also carries the CPU time at its start and end, of the whole process
(``args.cpu0_us`` / ``cpu1_us``: every thread, torch's intra-op pool and the backend's I/O
threads included) and of the main thread (``thread0_us`` / ``thread1_us``);
``fedsea report --project`` replays the steps' dependency graph from them
(:mod:`fedsea_hpc.study.project`).

Off (the default), every call here returns at once: a rank pays one attribute test per event.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import time

# Event categories. ``wire.post``/``wire.wait`` and ``collective`` are the dependency graph the
# projection replays; the rest name what the time between them was spent on.
COMPUTE, OPTIM, STEP, POST, WAIT, COLLECTIVE, OTHER = (
    "compute", "optimizer", "step", "wire.post", "wire.wait", "collective", "other")


class Tracer:
    """This rank's recorder (one per process: :data:`TRACE`)."""

    def __init__(self) -> None:
        self.on = False
        self.events: list[dict] = []
        self._seq: dict[tuple, itertools.count] = {}

    def begin(self, rank: int, label: str, threads: int) -> None:
        """Start recording; t = 0 now. Call right after a barrier every rank joins."""
        self.on, self.rank, self.label, self.threads = True, rank, label, threads
        self.events, self._seq = [], {}
        self._t0, self._cpu0, self._th0 = time.perf_counter_ns(), time.process_time_ns(), time.thread_time_ns()
        self.wall0_ns = time.time_ns()

    def _now(self) -> tuple[float, float, float]:
        """Wall, process CPU and this thread's CPU time since :meth:`begin`, in microseconds."""
        return ((time.perf_counter_ns() - self._t0) / 1e3, (time.process_time_ns() - self._cpu0) / 1e3,
                (time.thread_time_ns() - self._th0) / 1e3)

    def next_seq(self, key: tuple) -> int:
        """The next number of the sequence ``key`` (per peer and direction; per collective group)."""
        return next(self._seq.setdefault(key, itertools.count()))

    @contextlib.contextmanager
    def span(self, name: str, cat: str = COMPUTE, **args):
        """Record the ``with`` body as one slice on this rank's track (``args`` go with it)."""
        if not self.on:
            yield args
            return
        start = self._now()
        try:
            yield args  # the body may add to args (bytes known only at the end)
        finally:
            self.close(start, name, cat, **args)

    def stamp(self) -> tuple[float, float, float] | None:
        """Now, for a slice closed later by :meth:`close` (where a ``with`` block does not fit)."""
        return self._now() if self.on else None

    def close(self, stamp: tuple[float, float, float] | None, name: str, cat: str, **args) -> None:
        """Record the slice from ``stamp`` (:meth:`stamp`) to now."""
        if stamp is None or not self.on:
            return
        (ts, cpu0, th0), (end, cpu1, th1) = stamp, self._now()
        self.events.append({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": end - ts, "pid": self.rank,
                            "tid": 0, "args": {**args, "cpu0_us": cpu0, "cpu1_us": cpu1,
                                               "thread0_us": th0, "thread1_us": th1}})

    def post(self, direction: str, kind: str, peer: int, nbytes: int | None, exact: bool = True):
        """A send or receive being posted (a ``with`` block around the backend call): the
        message's sequence number on this (direction, peer) pair, and a flow start for a send."""
        if not self.on:
            return contextlib.nullcontext(None)
        seq = self.next_seq((direction, peer))
        args = {"direction": direction, "kind": kind, "peer": peer, "seq": seq, "exact": exact}
        if nbytes is not None:
            args["bytes"] = nbytes
        arrow = "→" if direction == "send" else "←"
        return self._message_span(f"post {direction} {kind} {arrow} rank {peer}", POST, args,
                                  flow="s" if direction == "send" else None)

    def wait(self, direction: str, kind: str, peer: int, seq: int | None):
        """Blocking until a posted message completes (``seq`` from its :meth:`post`)."""
        if not self.on or seq is None:
            return contextlib.nullcontext(None)
        arrow = "→" if direction == "send" else "←"
        return self._message_span(f"wait {direction} {kind} {arrow} rank {peer}", WAIT,
                                  {"direction": direction, "kind": kind, "peer": peer, "seq": seq},
                                  flow="f" if direction == "recv" else None)

    @contextlib.contextmanager
    def _message_span(self, name: str, cat: str, args: dict, flow: str | None):
        with self.span(name, cat, **args) as a:
            yield a
        if flow is not None:  # the arrow from a send's post to the wait that received it
            src, dst = (self.rank, a["peer"]) if flow == "s" else (a["peer"], self.rank)
            ev = self.events[-1]
            at = ev["ts"] + (ev["dur"] if flow == "s" else 0.0)
            self.events.append({"name": a["kind"], "cat": "flow", "ph": flow, "id": f"{src}>{dst}#{a['seq']}",
                                "ts": at, "pid": self.rank, "tid": 0, **({"bp": "e"} if flow == "f" else {})})

    def collective(self, name: str, ranks: list[int], nbytes: int):
        """A collective over global ``ranks`` (every member records it; numbered per group)."""
        if not self.on:
            return contextlib.nullcontext({})
        key = tuple(sorted(ranks))
        return self.span(name, COLLECTIVE, group=list(key), seq=self.next_seq(("collective", key)), bytes=nbytes)

    def end(self) -> dict:
        """Stop recording; this rank's part of the trace."""
        self.on = False
        part = {"rank": self.rank, "label": self.label, "threads": self.threads, "wall0_ns": self.wall0_ns,
                "events": self.events}
        self.events = []
        return part


TRACE = Tracer()


def span(name: str, cat: str = COMPUTE, **args):
    """``with trace.span("A forward"):`` on this rank's tracer (a no-op unless tracing)."""
    return TRACE.span(name, cat, **args)


def assemble(parts: list[dict], meta: dict) -> dict:
    """The job's trace from every rank's :meth:`Tracer.end` (rank order): Trace Event Format."""
    events = []
    for p in parts:
        events.append({"name": "process_name", "ph": "M", "pid": p["rank"], "args": {"name": f"rank {p['rank']} ({p['label']})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": p["rank"], "args": {"sort_index": p["rank"]}})
        events.append({"name": "thread_name", "ph": "M", "pid": p["rank"], "tid": 0, "args": {"name": "main"}})
        events.extend(p["events"])
    walls = [p["wall0_ns"] for p in parts]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {**meta, "ranks": [{k: p[k] for k in ("rank", "label", "threads")} for p in parts],
                          "clock": {"zero": "each rank leaves a barrier before the first traced step",
                                    "barrier_exit_spread_us": (max(walls) - min(walls)) / 1e3}}}


def gather(rank: int, meta: dict) -> str | None:
    """Collective over the world: every rank's events to rank 0, which gets the job's trace as
    JSON text (compact: a trace has many small events); the other ranks get None."""
    import torch.distributed as dist

    part = TRACE.end()
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return to_json(assemble(parts, meta)) if rank == 0 else None


def to_json(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"))
