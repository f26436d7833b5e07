"""Sweeps and reports (fedsea_hpc/study): the grid format, the report's arithmetic on run dirs
written here, and a sweep of the real entry point (runs, a failing point, re-run skips)."""
from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, subprocess_env
from fedsea_hpc.study import grid as grids
from fedsea_hpc.study import report


def _grid(tmp_path: Path, tree) -> str:
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return str(p)


def test_points_are_the_listed_entries_times_the_axes_in_a_fixed_order(tmp_path):
    g = grids.load(_grid(tmp_path, {
        "config": "configs/default.yaml", "repeats": 2, "set": {"train.steps": 4},
        "axes": {"topology.clients": [2, 4], "train.micro_batch_size": [1, 2]},
        "points": [{"train.mode": "sequential"}, {"train.mode": "parallel", "topology.servers": 2}]}))
    pts = g.points()
    assert len(pts) == 8 and [p.index for p in pts] == list(range(8)) and g.repeats == 2
    assert pts[0].overrides == {"train.steps": 4, "train.mode": "sequential", "topology.clients": 2,
                                "train.micro_batch_size": 1}
    assert pts[1].labels == {"train.mode": "sequential", "topology.servers": None, "topology.clients": 2,
                             "train.micro_batch_size": 2}
    assert pts[7].overrides["topology.servers"] == 2 and pts[7].overrides["topology.clients"] == 4
    assert pts[7].name == "p007"
    assert grids.load(g.path, repeats=5).repeats == 5  # the command line wins


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_the_table7_grids_train_every_scheme_on_the_same_samples(model):
    """benchmarks/table7.py's sweeps: sequential and client-batch on one server rank,
    server-hierarchical on one per 2 clients, 2/4/8 clients, centralized; 96 samples each."""
    from fedsea_hpc.config import load_config

    g = grids.load(str(REPO / "configs" / "sweeps" / f"table7-{model}.yaml"), None)
    seen = set()
    for p in g.points():
        cfg = load_config(str(REPO / g.config), [f"{k}={grids.flow(v)}" for k, v in p.overrides.items()])
        c, s, mode = cfg.topology.clients, cfg.topology.servers, cfg.train.mode
        assert cfg.run.trace and cfg.train.micro_batch_size * c * cfg.train.steps == 96, p.labels
        if mode == "centralized":
            seen.add(("centralized", None))
            continue
        scheme = "sequential" if mode == "sequential" else ("client-batch" if s == 1 else "server-hierarchical")
        assert s == (c // 2 if scheme == "server-hierarchical" else 1), p.labels
        seen.add((scheme, c))
    assert seen == {("centralized", None), *[(k, c) for k in ("sequential", "client-batch") for c in (2, 4, 8)],
                    ("server-hierarchical", 4), ("server-hierarchical", 8)}


def test_override_values_go_to_the_command_line_as_yaml_flow():
    p = grids.Point(0, {"peft.target_modules": ["q_proj", "v_proj"], "privacy.noise": False, "train.lr": 0.001,
                        "train.mode": "parallel"}, {})
    assert p.args() == ["peft.target_modules=[q_proj, v_proj]", "privacy.noise=false", "train.lr=0.001",
                        "train.mode=parallel"]
    from fedsea_hpc.config import parse_overrides

    assert parse_overrides(p.args())["peft"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("tree, field", [
    ("- a\n- b\n", "top level must be a mapping"),
    ({"axis": {}}, "unknown field 'axis'"),
    ({"config": "configs/nonexistent.yaml"}, "config: no such file"),
    ({"repeats": 0}, "repeats: expected an integer >= 1"),
    ({"axes": {"topology.clients": 2}}, "axes.topology.clients: expected a non-empty list"),
    ({"axes": {"topology.clients": []}}, "axes.topology.clients: expected a non-empty list"),
    ({"axes": {"clients": [1]}}, "key 'clients' must look like section.key"),
    ({"set": ["train.steps=3"]}, "set: expected a mapping"),
    ({"points": {"train.mode": "parallel"}}, "points: expected a list of mappings"),
    ({"points": [{"topology.clients": 2}], "axes": {"topology.clients": [2]}}, "topology.clients is also an axis"),
    ("axes: [unclosed\n", "invalid YAML"),
])
def test_a_malformed_grid_is_one_error_naming_the_field(tmp_path, tree, field):
    with pytest.raises(grids.GridError, match=field.replace("(", r"\(").replace(".", r"\.")):
        grids.load(_grid(tmp_path, tree))


def test_a_malformed_grid_exits_2_with_one_line_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "fedsea_hpc", "sweep", "--grid", _grid(tmp_path, {"repeats": -1}),
                        "--out", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"fedsea: error: --grid {tmp_path / 'grid.yaml'}: repeats: expected an integer >= 1, got -1"]
    assert not out.exists()
    p = subprocess.run([sys.executable, "-m", "fedsea_hpc", "report", str(tmp_path / "missing")], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True)
    assert p.returncode == 2 and "report: no such directory" in p.stderr and "Traceback" not in p.stderr


# --- report: run dirs written here, so every number is known --------------------------------------

def _run(d: Path, *, clients: int, mode: str, step_times: list[float], tokens: int, mem: dict, status="done",
         error=None, overrides=None):
    d.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": 5.0 - i * 0.1, "tokens": tokens, "samples": 4, "step_time_s": t,
             "bytes_sent": 1000 * clients, "phase_s": {"client_compute_s": t / 2, "wait_server_s": t / 4}}
            for i, t in enumerate(step_times)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"mode": mode, "final_loss": rows[-1]["loss"],
                                                "memory": {"measure": "rss", "peak_bytes": mem}}))
    (d / "config.yaml").write_text(yaml.safe_dump({"topology": {"clients": clients, "servers": 1},
                                                   "train": {"mode": mode}, "run": {"output_dir": str(d)}}))
    over = overrides if overrides is not None else {"topology.clients": clients, "train.mode": mode}
    (d / "run.json").write_text(json.dumps({"status": status, "error": error, "ranks": clients + 1,
                                            "overrides": over, "command": ["mpiexec", "..."]}))


def test_report_means_stds_efficiency_failures_and_plots(tmp_path):
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "sweep.json").write_text(json.dumps({"command": ["fedsea", "sweep"], "machine": {"host": "h", "cpus": 2}}))
    # p000: 2 clients, two repeats; warm-up steps (the first two) are slow and must not count
    _run(sw / "points/p000/r0", clients=2, mode="parallel", step_times=[9, 9, 1.0, 1.0], tokens=100,
         mem={"client": 300 * 2**20, "server": 500 * 2**20})
    _run(sw / "points/p000/r1", clients=2, mode="parallel", step_times=[9, 9, 2.0, 2.0], tokens=100,
         mem={"client": 310 * 2**20, "server": 480 * 2**20})
    # p001: 4 clients, 4x the tokens in 2x the time: efficiency (2x throughput for 2x clients) 1.0 for r0
    _run(sw / "points/p001/r0", clients=4, mode="parallel", step_times=[9, 9, 2.0], tokens=400,
         mem={"client": 320 * 2**20, "server": 700 * 2**20})
    # p002: failed, its error line kept
    (sw / "points/p002/r0").mkdir(parents=True)
    (sw / "points/p002/r0/run.json").write_text(json.dumps(
        {"status": "failed", "rc": 2, "ranks": 9, "error": "fedsea: error: topology.clients: 8 > 4",
         "overrides": {"topology.clients": 8, "train.mode": "parallel"}}))
    res = report.report([str(sw)])
    rows = {r["point"]: r for r in res["points"]}
    a, b, c = rows["sw/p000"], rows["sw/p001"], rows["sw/p002"]
    assert a["done"] == 2 and a["status"] == "done"
    assert a["step_time_s_mean"] == pytest.approx(1.5) and a["step_time_s_std"] == pytest.approx(statistics.stdev([1, 2]))
    assert a["tokens_per_s_mean"] == pytest.approx((100 + 50) / 2)
    assert a["memory"] == {"client": 310 * 2**20, "server": 500 * 2**20}
    assert a["bytes_per_step"] == 2000 and a["phases"]["client_compute_s"] == pytest.approx(0.75)
    assert a["axes"] == {"topology.clients": 2, "train.mode": "parallel"} or a["axes"] == {"topology.clients": 2}
    assert a["efficiency"] == pytest.approx(1.0) and b["efficiency"] == pytest.approx((200 / 75) / 2)
    assert c["status"] == "failed" and c["error"] == "fedsea: error: topology.clients: 8 > 4"
    with open(sw / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["point"] for t in table] == ["sw/p000", "sw/p001", "sw/p002"]
    assert float(table[0]["step_time_s_mean"]) == pytest.approx(1.5) and table[2]["error"].endswith("8 > 4")
    md = (sw / "results.md").read_text()
    assert "1.500 ± 0.707" in md and "oversubscribed: 3 ranks on 2 cores" in md and "8 > 4" in md
    assert "fedsea sweep" in md
    for png in ("throughput_vs_clients.png", "phases.png", "memory.png"):
        assert (sw / png).read_bytes()[:4] == b"\x89PNG", png
    assert json.loads((sw / "results.json").read_text())["plots"] == res["plots"]


def test_report_of_plain_run_dirs_takes_its_axes_from_their_configs(tmp_path):
    _run(tmp_path / "runs" / "a", clients=1, mode="sequential", step_times=[1, 1, 1], tokens=10, mem={},
         overrides={})
    _run(tmp_path / "runs" / "b", clients=1, mode="parallel", step_times=[1, 1, 2], tokens=10, mem={},
         overrides={})
    for d in ("a", "b"):
        (tmp_path / "runs" / d / "run.json").unlink()
    res = report.report([str(tmp_path / "runs")], str(tmp_path / "rep"))
    assert [r["axes"] for r in res["points"]] == [{"train.mode": "sequential"}, {"train.mode": "parallel"}]
    assert (tmp_path / "rep" / "results.md").is_file()


# --- the real entry point -----------------------------------------------------------------------

@pytest.mark.multirank
def test_sweep_runs_each_point_records_a_failure_goes_on_and_a_rerun_skips_what_is_done(tmp_path, mpiexec_path):
    g = _grid(tmp_path, {
        "config": "configs/default.yaml",
        "set": {"train.steps": 3, "topology.servers": 1, "comm.timeout_s": 30},
        "points": [{"topology.clients": 1, "train.mode": "sequential"},
                   {"topology.clients": 1, "train.mode": "sequential", "train.seq_len": 8},  # fails in the ranks
                   {"topology.clients": 1, "train.mode": "centralized"},
                   {"topology.clients": 1, "train.lr": -1}]})  # invalid config: fails before any launch
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fedsea_hpc", "sweep", "--grid", g, "--out", str(out)]
    env = subprocess_env({"PATH": f"{mpiexec_path.parent}:{subprocess_env()['PATH']}"})
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 1, p.stdout + p.stderr  # one point failed
    recs = [json.loads((out / f"points/p00{i}/r0/run.json").read_text()) for i in range(4)]
    assert [r["status"] for r in recs] == ["done", "failed", "done", "failed"], recs
    assert recs[0]["ranks"] == 2 and recs[2]["ranks"] == 1 and recs[1]["rc"] not in (0, None)
    assert "seq_len=8" in recs[1]["error"], recs[1]
    assert recs[3] | {"started": 0} == recs[3] | {"started": 0, "status": "failed", "rc": 2, "command": None,
                                                  "error": "fedsea: error: train.lr: must be > 0, got -1.0"}
    assert "mpiexec" in recs[0]["command"][0] and recs[2]["command"][0] == sys.executable
    s = json.loads((out / "points/p000/r0/summary.json").read_text())
    assert s["steps"] == 3 and set(s["memory"]["peak_bytes"]) == {"client", "server"}
    assert s["memory"]["parts"]["client0"]["parameters"] > 0 and s["memory"]["parts"]["server"]["optimizer"] > 0
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["done", "failed", "done", "failed"]
    assert float(table[0]["tokens_per_s_mean"]) > 0 and table[1]["error"] == recs[1]["error"]
    assert float(table[2]["peak_mem_centralized_bytes"]) > 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["points"]) == 4 and sweep["machine"]["libraries"]["torch"]

    # again with two repeats: r0 of the done points is skipped, r1 runs; the failed point runs again
    done_at = (out / "points/p000/r0/run.json").stat().st_mtime_ns
    p = subprocess.run([*cmd, "--repeats", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "p000 r0" in p.stdout and "skipped (done)" in p.stdout.split("p000 r0", 1)[1].splitlines()[0]
    assert (out / "points/p000/r0/run.json").stat().st_mtime_ns == done_at
    assert json.loads((out / "points/p000/r1/run.json").read_text())["status"] == "done"
    assert json.loads((out / "points/p001/r1/run.json").read_text())["status"] == "failed"
    with open(out / "results.csv") as f:
        assert [t["repeats_done"] for t in csv.DictReader(f)] == ["2", "0", "2", "0"]
