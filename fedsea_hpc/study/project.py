"""``fedsea report --project``: what a traced run's steps would take with one device per rank.

A PROJECTION, never a measurement. The machine a study runs on usually has fewer cores than the
job has ranks, so measured step times include every rank waiting for a core. From the job's
``trace.json`` (``run.trace=true``, :mod:`fedsea_hpc.trace`) this module replays the
steps' dependency graph as if every rank ran alone on its own device:

* **Work** between two points where a rank depends on another one is the CPU time the rank
  spent over the interval: its main thread's with one torch thread (the backend's I/O threads
  are the link's, modelled below), its whole process's divided by its torch threads with more
  (ideal scaling). Time a rank spends blocked (a wait on a message, a collective) is not work:
  the replay decides how long it blocks.
* **Messages** match by sender, receiver and per-pair sequence number (a channel delivers in
  order). A message moves once the sender has posted it and the receiver has posted its
  receive (gloo and NCCL move a payload only into a posted buffer): it arrives ``latency +
  bytes * s_per_byte`` later; a receive posted without its size (the header read first) pays a
  second latency after the receiver starts waiting. A send completes when its message arrives.
  Links do not contend with each other.
* **Collectives** end when the last member arrives, plus ``2 ceil(log2 n) latency + 2 (n-1)/n
  bytes s_per_byte`` (a ring all-reduce). Collectives inside DeepSpeed (ZeRO across server
  ranks) are not traced and count as the server's work.
* **Link model**: one latency and seconds per byte for every link: given
  (``--link-latency-us``, ``--link-gbps``); else the run's own start-up ping-pong
  (``summary.json`` ``wire_probe``, mean over the clients' links) when the run had a core per
  rank; else a ping-pong the report measures on its own machine with two processes on two
  cores (:mod:`fedsea_hpc.study.pingpong`), since an oversubscribed run's probe timed the wait
  for a core as much as the link.

The projected step time is the mean, over the steps after warm-up, of the time between the
ends of consecutive steps on the slowest rank, the same definition as the measured one.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fedsea_hpc.errors import InputError
from fedsea_hpc.trace import COLLECTIVE, POST, STEP, WAIT

WARMUP = 2
_PREFIX = {POST: "post", WAIT: "wait", COLLECTIVE: "coll", STEP: "step"}  # a replayed slice's point names


class ProjectionError(InputError):
    """The trace cannot be replayed (missing, not a fedsea trace, inconsistent)."""


def link_model(summary: dict, trace_meta: dict, latency_us: float | None = None, gbps: float | None = None,
               measure=None) -> dict:
    """Latency (s) and seconds per byte of every link, and where they come from: given
    (``latency_us``, ``gbps``) where given; else the run's own start-up probe when it had a core
    per rank; else a fresh ping-pong on this machine (``measure``, default
    :func:`fedsea_hpc.study.pingpong.measure`), the probe of an oversubscribed run having timed
    the wait for a core as much as the link."""
    ranks, cpus = len(trace_meta.get("ranks", [])), (trace_meta.get("machine") or {}).get("cpus") or 0
    probe = summary.get("wire_probe") or {}
    lat = [v for v in probe.get("latency_s", []) if v is not None]
    spb = [v for v in probe.get("s_per_byte", []) if v is not None]
    out: dict = {}
    if lat and spb and cpus >= ranks:
        out = {"latency_s": statistics.fmean(lat), "s_per_byte": statistics.fmean(spb),
               "source": "measured: the run's start-up probe (summary.json wire_probe; a core per rank)"}
    elif ranks > 1 and (latency_us is None or gbps is None):
        from fedsea_hpc.study import pingpong

        out = (measure or pingpong.measure)()
        out = {k: out[k] for k in ("latency_s", "s_per_byte", "source")}
    else:  # one rank (centralized) sends nothing
        out = {"latency_s": 0.0, "s_per_byte": 0.0, "source": "none: a single rank"}
    if latency_us is not None:
        out["latency_s"] = latency_us * 1e-6
    if gbps is not None:
        out["s_per_byte"] = 8 / (gbps * 1e9)
    if latency_us is not None or gbps is not None:
        out["source"] = "given (--link-latency-us / --link-gbps)" + (f"; the rest {out['source']}"
                                                                    if latency_us is None or gbps is None else "")
    return out


def _markers(events: list[dict], threads: int) -> list[tuple]:
    """One rank's dependency points in the order the rank met them: (kind, key, work_before_s,
    extra). Slices nest (one thread), so a walk with a stack puts every begin and end in order,
    an inner slice's end before its outer one's at the same instant."""
    c0, c1, scale = ("thread0_us", "thread1_us", 1) if threads <= 1 else ("cpu0_us", "cpu1_us", threads)
    points = []  # (cpu_us, kind, key, extra)

    def edge(e: dict, which: str) -> None:
        """The point where slice ``e`` begins or ends (``which``), if the replay needs one: a
        wait's, a collective's and a step's both ends; a post's end (the message is the
        backend's once the post returns)."""
        a, cat = e["args"], e["cat"]
        if cat not in _PREFIX or (cat == POST and which == "begin"):
            return
        if cat in (POST, WAIT):
            key = (a["direction"], a["peer"], a["seq"])
        else:
            key = (tuple(a["group"]), a["seq"]) if cat == COLLECTIVE else a["step"]
        extra = ({"bytes": a.get("bytes"), "exact": a.get("exact", True)} if cat == POST
                 else {"bytes": a["bytes"]} if cat == COLLECTIVE else {})
        kind = _PREFIX[cat] if cat == POST else f"{_PREFIX[cat]}_{which}"
        points.append((a[c0] if which == "begin" else a[c1], kind, key, extra))

    stack: list[dict] = []
    for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
            edge(stack.pop(), "end")
        edge(e, "begin")
        stack.append(e)
    while stack:
        edge(stack.pop(), "end")
    out, last_cpu, blocked = [], None, False
    for cpu, kind, key, extra in points:
        work = 0.0 if last_cpu is None or blocked else max(cpu - last_cpu, 0.0) / 1e6 / scale
        out.append((kind, key, work, extra))
        last_cpu = cpu
        blocked = kind in ("wait_begin", "coll_begin")
    return out


def replay(trace: dict, link: dict) -> dict:
    """Replay every rank's markers; per step, the projected end time of the slowest rank."""
    if "traceEvents" not in trace or "ranks" not in trace.get("otherData", {}):
        raise ProjectionError("not a fedsea trace (no traceEvents / otherData.ranks): was it written with run.trace=true?")
    ranks = {r["rank"]: r for r in trace["otherData"]["ranks"]}
    by_rank: dict[int, list] = {r: [] for r in ranks}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in by_rank:
            by_rank[e["pid"]].append(e)
    try:
        marks = {r: _markers(ev, ranks[r]["threads"]) for r, ev in by_rank.items()}
    except KeyError as e:
        raise ProjectionError(f"a trace event lacks {e} (a trace of another fedsea-hpc version?)") from None
    lat, spb = link["latency_s"], link["s_per_byte"]
    t = dict.fromkeys(marks, 0.0)
    pos = dict.fromkeys(marks, 0)
    posted: dict[tuple, float] = {}  # (src, dst, seq, 'send'|'recv') -> projected post time
    sizes: dict[tuple, tuple] = {}  # (src, dst, seq) -> (bytes, exact receive)
    wait_from: dict[tuple, float] = {}  # (src, dst, seq) -> when the receiver started waiting
    arrived: dict[tuple, float] = {}
    coll: dict[tuple, dict[int, float]] = {}
    step_end: dict[int, dict[int, float]] = {}
    step_begin: dict[int, dict[int, float]] = {}

    def arrival(msg: tuple) -> float | None:
        if msg in arrived:
            return arrived[msg]
        s, r = posted.get(msg + ("send",)), posted.get(msg + ("recv",))
        if s is None or r is None or msg not in sizes:
            return None
        nbytes, exact = sizes[msg]
        at = max(s, r) + lat + nbytes * spb
        if not exact:  # the payload receive is posted once the header is in and the receiver waits
            if msg not in wait_from:
                return None
            at = max(max(s, r) + lat, wait_from[msg]) + lat + nbytes * spb
        arrived[msg] = at
        return at

    while any(pos[r] < len(marks[r]) for r in marks):
        moved = False
        for r in marks:
            while pos[r] < len(marks[r]):
                kind, key, work, extra = marks[r][pos[r]]
                now = t[r] + work
                if kind == "post":
                    direction, peer, seq = key
                    msg = (r, peer, seq) if direction == "send" else (peer, r, seq)
                    posted[msg + (direction,)] = now
                    if direction == "send":
                        sizes[msg] = (extra["bytes"] or 0, sizes.get(msg, (0, True))[1])
                    else:
                        sizes.setdefault(msg, (0, True))
                        sizes[msg] = (sizes[msg][0], bool(extra["exact"]))
                elif kind == "wait_begin":
                    direction, peer, seq = key
                    if direction == "recv":
                        wait_from[(peer, r, seq)] = now
                elif kind == "wait_end":
                    direction, peer, seq = key
                    done = arrival((r, peer, seq) if direction == "send" else (peer, r, seq))
                    if done is None:
                        break  # blocked on a rank that has not got there yet
                    now = max(now, done)
                elif kind == "coll_begin":
                    coll.setdefault(key, {})[r] = now
                elif kind == "coll_end":
                    group, _ = key
                    arrivals = coll.get(key, {})
                    if len(arrivals) < len(group):
                        break
                    n = len(group)
                    cost = 0.0 if n == 1 else 2 * math.ceil(math.log2(n)) * lat + 2 * (n - 1) / n * extra["bytes"] * spb
                    now = max(now, max(arrivals.values()) + cost)
                elif kind == "step_begin":
                    step_begin.setdefault(key, {})[r] = now
                elif kind == "step_end":
                    step_end.setdefault(key, {})[r] = now
                t[r] = now
                pos[r] += 1
                moved = True
        if not moved:
            stuck = {r: marks[r][pos[r]][:2] for r in marks if pos[r] < len(marks[r])}
            raise ProjectionError(f"the trace's dependency graph does not close (ranks blocked at {stuck}); "
                                  "was it cut short?")
    steps = sorted(step_end)
    ends = [max(step_end[s].values()) for s in steps]
    first = min(step_begin[steps[0]].values()) if steps else 0.0
    durations = [b - a for a, b in zip([first] + ends[:-1], ends)]
    return {"steps": steps, "projected_step_s": durations}


def measured_steps(trace: dict) -> list[float]:
    """The traced steps' measured durations: per step, the slowest rank's step slice."""
    per: dict[int, float] = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == STEP:
            per[e["args"]["step"]] = max(per.get(e["args"]["step"], 0.0), e["dur"] / 1e6)
    return [per[s] for s in sorted(per)]


def project_run(run_dir: Path, latency_us: float | None = None, gbps: float | None = None) -> dict:
    """Project one run dir (``trace.json``, ``summary.json``); writes ``projection.json`` there."""
    from fedsea_hpc.components.outputs import write_json

    path = run_dir / "trace.json"
    try:
        trace = json.loads(path.read_text())
    except OSError as e:
        raise ProjectionError(f"{path}: cannot read ({e.strerror}); run with run.trace=true to project") from None
    except ValueError as e:
        raise ProjectionError(f"{path}: not JSON ({e})") from None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    link = link_model(summary, trace.get("otherData", {}), latency_us, gbps)
    res = replay(trace, link)
    steady = slice(min(WARMUP, max(len(res["steps"]) - 1, 0)), None)
    measured = measured_steps(trace)
    out = {
        "kind": "PROJECTION: one device per rank, replayed from a trace (fedsea_hpc.study.project)",
        "run": str(run_dir),
        "link": link,
        "threads": {r["rank"]: r["threads"] for r in trace["otherData"]["ranks"]},
        "steps": res["steps"],
        "projected_step_s": [round(x, 6) for x in res["projected_step_s"]],
        "measured_step_s": [round(x, 6) for x in measured],
        "projected_mean_step_s": statistics.fmean(res["projected_step_s"][steady]) if res["steps"] else None,
        "measured_mean_step_s": statistics.fmean(measured[steady]) if measured else None,
        "warmup_steps_excluded": steady.start,
    }
    write_json(str(run_dir / "projection.json"), out)
    return out
