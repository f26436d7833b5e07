"""run.trace=true (fedsea_hpc.trace) and its replay, ``fedsea report --project``
(fedsea_hpc.study.project): the recorder and the replay on hand-made traces, then the real
entry point under mpiexec."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, check_ok, load_metrics, load_summary, run_fedsea, subprocess_env
from fedsea_hpc import trace as tr
from fedsea_hpc.study.project import ProjectionError, link_model, replay

# ------------------------------------------------------------------ the recorder


def test_an_idle_tracer_records_nothing():
    t = tr.Tracer()
    with t.span("A forward") as a:
        assert a == {}
    with t.post("send", "activation", 1, 64) as ev:
        assert ev is None
    with t.wait("recv", "activation", 1, None) as ev:
        assert ev is None
    t.close(t.stamp(), "step 1", tr.STEP)
    assert t.events == []


def test_spans_messages_and_flows_on_one_clock():
    t = tr.Tracer()
    t.begin(3, "server 0", threads=2)
    with t.span("B forward"):
        sum(range(20000))
    with t.post("send", "activation", 0, 128) as ev:
        pass
    with t.wait("send", "activation", 0, ev["seq"]):
        pass
    with t.post("send", "gradient", 0, 128) as ev2:
        pass
    with t.post("recv", "gradient", 0, None, exact=False) as rv:
        pass
    with t.wait("recv", "gradient", 0, rv["seq"]) as w:
        w["bytes"] = 32
    with t.collective("metrics all-reduce", [3, 0, 1, 2], 88):
        pass
    part = t.end()
    assert not t.on and part["rank"] == 3 and part["threads"] == 2
    xs = [e for e in part["events"] if e["ph"] == "X"]
    assert [e["cat"] for e in xs] == [tr.COMPUTE, tr.POST, tr.WAIT, tr.POST, tr.POST, tr.WAIT, tr.COLLECTIVE]
    assert [e["ts"] for e in xs] == sorted(e["ts"] for e in xs) and all(e["dur"] >= 0 for e in xs)
    # per (direction, peer) numbering: the two sends are 0 and 1, the receive 0
    assert (ev["seq"], ev2["seq"], rv["seq"]) == (0, 1, 0)
    assert xs[4]["args"]["exact"] is False and "bytes" not in xs[4]["args"] and xs[5]["args"]["bytes"] == 32
    assert xs[6]["args"]["group"] == [0, 1, 2, 3] and xs[6]["args"]["seq"] == 0
    for e in xs:
        a = e["args"]
        assert a["cpu1_us"] >= a["cpu0_us"] >= 0 and a["thread1_us"] >= a["thread0_us"] >= 0
    assert xs[0]["args"]["thread1_us"] > xs[0]["args"]["thread0_us"]  # the body did burn CPU
    flows = [e for e in part["events"] if e["ph"] in ("s", "f")]
    assert [(f["ph"], f["id"]) for f in flows] == [("s", "3>0#0"), ("s", "3>0#1"), ("f", "0>3#0")]
    doc = tr.assemble([part], {"job": "train"})
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {"rank 3 (server 0)"} and doc["otherData"]["job"] == "train"
    json.dumps(doc)  # plain JSON


# ------------------------------------------------------------------ the replay on hand-made traces


class Rank:
    """A hand-made rank's slices on one wall clock and one CPU clock (ms): ``work`` burns CPU,
    ``wait`` and ``collective`` take wall time only (blocked), posts are instants."""

    def __init__(self, rank: int):
        self.rank, self.wall, self.cpu, self.events, self.open = rank, 0.0, 0.0, [], []

    def _slice(self, cat: str, wall_ms: float, cpu_ms: float, **args) -> None:
        self.events.append({"ph": "X", "cat": cat, "name": cat, "pid": self.rank, "tid": 0, "ts": self.wall * 1e3,
                            "dur": wall_ms * 1e3, "args": {**args, **self._cpu(self.cpu, self.cpu + cpu_ms)}})
        self.wall += wall_ms
        self.cpu += cpu_ms

    @staticmethod
    def _cpu(c0: float, c1: float) -> dict:
        return {"cpu0_us": c0 * 1e3, "cpu1_us": c1 * 1e3, "thread0_us": c0 * 1e3, "thread1_us": c1 * 1e3}

    def work(self, ms: float) -> Rank:
        self._slice(tr.COMPUTE, ms, ms)
        return self

    def post(self, direction: str, peer: int, seq: int, nbytes: int | None, exact: bool = True) -> Rank:
        self._slice(tr.POST, 0, 0, direction=direction, kind="activation", peer=peer, seq=seq, exact=exact,
                    **({} if nbytes is None else {"bytes": nbytes}))
        return self

    def wait(self, direction: str, peer: int, seq: int, wall_ms: float) -> Rank:
        self._slice(tr.WAIT, wall_ms, 0, direction=direction, kind="activation", peer=peer, seq=seq)
        return self

    def collective(self, group: list[int], nbytes: int, wall_ms: float) -> Rank:
        self._slice(tr.COLLECTIVE, wall_ms, 0, group=group, seq=0, bytes=nbytes)
        return self

    def step(self, build) -> Rank:
        """Wrap what ``build(self)`` adds into step 1."""
        w0, c0 = self.wall, self.cpu
        build(self)
        self.events.insert(0, {"ph": "X", "cat": tr.STEP, "name": "step 1", "pid": self.rank, "tid": 0,
                               "ts": w0 * 1e3, "dur": (self.wall - w0) * 1e3,
                               "args": {"step": 1, **self._cpu(c0, self.cpu)}})
        return self


def _doc(*ranks: Rank) -> dict:
    return {"traceEvents": [e for r in ranks for e in r.events],
            "otherData": {"ranks": [{"rank": r.rank, "label": str(r.rank), "threads": 1} for r in ranks]}}


def _request_reply(exact: bool = True) -> dict:
    """Rank 0: 10 ms of work, sends 1e6 bytes, waits for the reply. Rank 1: posts its receive
    at once, waits, 5 ms of work, replies with 1e6 bytes. The waits took 100 ms of wall time (as
    in an oversubscribed run) and no CPU: the replay must not care."""
    mb = 10**6
    c = Rank(0).step(lambda r: r.work(10).post("recv", 1, 0, mb).post("send", 1, 0, mb).wait("recv", 1, 0, 100))
    s = Rank(1).step(lambda r: r.post("recv", 0, 0, mb if exact else None, exact).wait("recv", 0, 0, 100)
                     .work(5).post("send", 0, 0, mb).wait("send", 0, 0, 1))
    return _doc(c, s)


def test_a_request_and_its_reply_take_work_plus_two_transfers():
    link = {"latency_s": 1e-3, "s_per_byte": 1e-9}  # 1 ms + 1 ms per message of 1e6 bytes
    res = replay(_request_reply(), link)
    # 10 ms work, 2 ms up, 5 ms server work, 2 ms back (the client's step ends on arrival)
    assert res["steps"] == [1]
    assert res["projected_step_s"][0] == pytest.approx(0.019, rel=1e-9)


def test_a_receive_posted_without_its_size_pays_a_second_latency():
    link = {"latency_s": 1e-3, "s_per_byte": 1e-9}
    assert replay(_request_reply(exact=False), link)["projected_step_s"][0] == pytest.approx(0.020, rel=1e-9)


def test_a_collective_ends_after_its_last_member_plus_a_ring_all_reduce():
    ranks = [Rank(r).step(lambda x, w=w: x.work(w).collective([0, 1, 2, 3], 1000, 40)) for r, w in enumerate((1, 4, 2, 3))]
    res = replay(_doc(*ranks), {"latency_s": 1e-4, "s_per_byte": 1e-9})
    cost = 2 * 2 * 1e-4 + 2 * 3 / 4 * 1000 * 1e-9  # 2 ceil(log2 4) latencies + ring bytes
    assert res["projected_step_s"][0] == pytest.approx(0.004 + cost, rel=1e-9)


def test_a_trace_whose_graph_does_not_close_is_an_error():
    doc = _request_reply()
    doc["traceEvents"] = [e for e in doc["traceEvents"]
                          if not (e["pid"] == 1 and e["cat"] == tr.POST and e["args"]["direction"] == "send")]
    with pytest.raises(ProjectionError, match="does not close"):
        replay(doc, {"latency_s": 1e-3, "s_per_byte": 1e-9})
    with pytest.raises(ProjectionError, match="not a fedsea trace"):
        replay({"traceEvents": []}, {"latency_s": 0, "s_per_byte": 0})


def test_the_link_model_takes_given_values_then_the_runs_probe_then_a_fresh_ping_pong():
    summary = {"wire_probe": {"latency_s": [2e-4, 4e-4], "s_per_byte": [1e-9, 3e-9]}}
    meta = {"ranks": [{}, {}, {}], "machine": {"cpus": 4}}
    assert link_model(summary, meta)["latency_s"] == pytest.approx(3e-4)
    fresh = {"latency_s": 5e-5, "s_per_byte": 4e-10, "source": "fresh"}
    over = {"ranks": [{}] * 3, "machine": {"cpus": 2}}  # oversubscribed: the probe timed the cores too
    assert link_model(summary, over, measure=lambda: fresh)["latency_s"] == 5e-5
    given = link_model(summary, over, latency_us=10, gbps=8, measure=lambda: fresh)
    assert given["latency_s"] == pytest.approx(1e-5) and given["s_per_byte"] == pytest.approx(1e-9)
    assert given["source"].startswith("given")


# ------------------------------------------------------------------ the real entry point


@pytest.fixture(scope="module")
def traced(tmp_path_factory, mpiexec_path) -> dict[str, Path]:
    """Two traced jobs: parallel, 2 clients x 2 ZeRO-3 servers, FedSGD; sequential, 2 clients x
    1 server, LoRA, FedAvg every 2 steps."""
    root = tmp_path_factory.mktemp("traced")
    out = {}
    for name, args, n in [
        ("parallel", ["topology.clients=2", "topology.servers=2", "deepspeed.zero_stage=3",
                      "federated.avg_every=1"], 4),
        ("sequential", ["train.mode=sequential", "topology.clients=2", "topology.servers=1", "peft.lora_r=4",
                        "federated.avg_every=2"], 3),
    ]:
        d = root / name
        check_ok(run_fedsea([*args, "train.steps=6", "run.trace=true", f"run.output_dir={d}"], n=n, timeout=300))
        out[name] = d
    return out


def _load(d: Path) -> dict:
    return json.loads((d / "trace.json").read_text())


@pytest.mark.multirank
@pytest.mark.parametrize("which", ["parallel", "sequential"])
def test_a_traced_job_has_one_track_per_rank_and_every_message_on_both_ends(traced, which):
    d = traced[which]
    doc = _load(d)
    ranks = doc["otherData"]["ranks"]
    world = 4 if which == "parallel" else 3
    assert [r["label"] for r in ranks] == ["client 0", "client 1"] + [f"server {i}" for i in range(world - 2)]
    xs = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    assert {e["pid"] for e in xs} == set(range(world)) and all(e["tid"] == 0 for e in xs)
    names = {(e["pid"], e["name"]) for e in xs}
    for c in (0, 1):
        for part in ("A forward", "C forward+loss+backward", "A backward", "optimizer step (AdamW, parts A+C)"):
            assert (c, part) in names
    for s in range(2, world):
        for part in ("B forward (DeepSpeed engine)", "B backward (DeepSpeed engine.backward)", "DeepSpeed step (part B)"):
            assert (s, part) in names
    sync = "FedSGD gradient sum" if which == "parallel" else "FedAvg"
    assert {e["pid"] for e in xs if e["name"] == sync} == {0, 1}
    assert sorted(e["args"]["step"] for e in xs if e["cat"] == tr.STEP) == sorted(list(range(1, 7)) * world)
    # every send has its receive: same (src, dst, seq), same kind, same bytes
    sends = {(e["pid"], e["args"]["peer"], e["args"]["seq"]): e for e in xs
             if e["cat"] == tr.POST and e["args"]["direction"] == "send"}
    recvs = {(e["args"]["peer"], e["pid"], e["args"]["seq"]): e for e in xs
             if e["cat"] == tr.WAIT and e["args"]["direction"] == "recv"}
    assert sends.keys() == recvs.keys() and sends
    for k, s in sends.items():
        assert s["args"]["kind"] == recvs[k]["args"]["kind"] and s["args"]["bytes"] == recvs[k]["args"]["bytes"], k
    flows = [e for e in doc["traceEvents"] if e.get("ph") in ("s", "f")]
    assert sorted(f["id"] for f in flows if f["ph"] == "s") == sorted(f["id"] for f in flows if f["ph"] == "f")
    # the trace's bytes are the metrics' bytes, step by step
    steps = sorted((e for e in xs if e["cat"] == tr.STEP), key=lambda e: e["ts"])
    for row in load_metrics(d):
        spans = [e for e in steps if e["args"]["step"] == row["step"]]
        in_step = [s for s in sends.values()
                   if any(p["pid"] == s["pid"] and p["ts"] <= s["ts"] <= p["ts"] + p["dur"] for p in spans)]
        by_kind = {}
        for s in in_step:
            by_kind[s["args"]["kind"]] = by_kind.get(s["args"]["kind"], 0) + s["args"]["bytes"]
        assert by_kind == {k: v for k, v in row["bytes_sent_by_kind"].items() if v and k != "header"}, row["step"]
    # every collective is recorded by every member, the same number of times
    coll: dict[tuple, set] = {}
    for e in xs:
        if e["cat"] == tr.COLLECTIVE:
            coll.setdefault((tuple(e["args"]["group"]), e["args"]["seq"]), set()).add(e["pid"])
    assert coll and all(set(g) == members for (g, _), members in coll.items())


@pytest.mark.multirank
def test_report_project_replays_the_traced_runs(traced, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedsea_hpc", "report", "--project", "--out", str(tmp_path),
                           *[str(d) for d in traced.values()]], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    for d in traced.values():
        p = json.loads((d / "projection.json").read_text())
        assert p["kind"].startswith("PROJECTION")
        assert p["steps"] == list(range(1, 7)) and len(p["measured_step_s"]) == 6
        assert all(0 < x for x in p["projected_step_s"])
        # every rank's CPU work is part of the projected step; never more than the measured wall time
        # by more than the link model can add
        assert p["projected_mean_step_s"] < 3 * p["measured_mean_step_s"]
        assert p["link"]["latency_s"] > 0 and p["link"]["source"]
        assert load_summary(d)["steps"] == 6
    md = (tmp_path / "results.md").read_text()
    assert "PROJECTED step s, one device per rank" in md and "not a measurement" in md
    rows = json.loads((tmp_path / "results.json").read_text())["points"]
    assert all(r["projected_step_s_mean"] > 0 for r in rows)
