"""Does rebalancing pay? Uniform split vs every static partition of a grid vs ``split.rebalance=once``.

SmolLM2-135M (30 blocks), 2 clients + 1 server, ``train.mode=parallel``, LoRA. Heterogeneity is
EMULATED (``emulate.*``: sleeps, not slower hardware) in two scenarios: client 1 computing 4x
slower, and client 1 behind a 100 Mbit/s link. Per scenario:

* (a) the default uniform split, p = q = 1 for both clients;
* (b) every static partition of a grid, k_0 in ``--grid``, k_1 in ``--grid-client1`` (k_c = p_c +
  q_c with p_c = 1, q_c = k_c - 1: what the planner keeps for p), the fastest being the oracle;
* (c) the uniform split with ``split.rebalance=once`` after ``--warmup`` steps (and
  ``split.rebalance_min_gain=--min-gain``, 1.05 here rather than the default 1.25, so that a
  gain the planner predicts below 1.25x still shows in the table): its step time is
  the mean over the steps after the move (the first one skipped), its one-off cost (plan +
  migrate seconds) is reported apart, with the steps needed to earn it back against (a).

Step times are the runs' own ``step_time_s`` (max over ranks), means over the steps after the
first two (static runs) or after the move. Each configuration runs through the real CLI under
``mpiexec``. Every rank computes with ``--threads`` torch threads (``OMP_NUM_THREADS``, 1 by
default): the three ranks then stand for three alike one-core devices. In lockstep the phases
take turns (the two clients compute A and C while the server waits, the server computes B while
the clients wait), so on a 2-core machine no two computing ranks share a core, and the only
heterogeneity is the EMULATED one. (The project's default thread share gives a lone server rank
every core during B, which makes server blocks cheaper than client blocks for a reason no
cluster has.)

    python benchmarks/rebalance.py --out benchmarks/results/rebalance.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SMOLLM2_DIR, ensure_smollm2, machine_info, mpiexec, run_cmd, tail, wait_quiet  # noqa: E402

SCENARIOS = {
    "client 1 4x slower (EMULATED)": ["emulate.client_slowdown=[1,4]"],
    "client 1 on 100 Mbit/s (EMULATED)": ["emulate.link_mbps=[0,100]"],
}
SKIP = 2  # steps left out of a static run's mean (warm-up), as summary.json's mean_step_time_s


def _run(tag: str, overrides: list[str], out: Path, args) -> dict:
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "fedsea_hpc", "train", f"model.name_or_path={SMOLLM2_DIR}",
           "topology.clients=2", "topology.servers=1", f"train.seq_len={args.seq_len}",
           f"train.micro_batch_size={args.micro_batch}", "run.progress=false", f"run.output_dir={out}", *overrides]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
    busy = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else float("nan")
    print(f"[{tag}] {' '.join(overrides)}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):  # a rendezvous port taken by another process between pick and bind: retry
        rc, wall, _, foreign = run_cmd(cmd, env, args.timeout, out.parent / f"{out.name}.log")
        if rc == 0 or "EADDRINUSE" not in tail(out.parent / f"{out.name}.log"):
            break
        shutil.rmtree(out, ignore_errors=True)
    if rc != 0:
        raise RuntimeError(f"{tag} exited {rc}; log tail:\n{tail(out.parent / f'{out.name}.log')}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"rows": rows, "summary": summary, "process_wall_s": wall, "cpu_s_foreign": foreign, "busy_before": busy}


def _static(k: tuple[int, int]) -> str:
    return f"split.per_client=[[1,{k[0] - 1}],[1,{k[1] - 1}]]"


def run_scenario(name: str, emu: list[str], args, root: Path) -> dict:
    grid = sorted({int(v) for v in args.grid.split(",")})
    grid1 = sorted({int(v) for v in args.grid_client1.split(",")})
    static = {}
    for k0 in grid:
        for k1 in grid1:
            r = _run(f"{name} static k=({k0},{k1})", [*emu, _static((k0, k1)), f"train.steps={args.steps}"],
                     root / f"{len(static)}-static", args)
            times = [row["step_time_s"] for row in r["rows"][SKIP:]]
            static[(k0, k1)] = {"k": [k0, k1], "mean_step_s": sum(times) / len(times),
                                "final_loss": r["summary"]["final_loss"], "cpu_s_foreign": r["cpu_s_foreign"]}
            print(f"  k=({k0},{k1}): {static[(k0, k1)]['mean_step_s'] * 1000:.0f} ms/step", flush=True)
    uniform = static[(2, 2)]
    oracle = min(static.values(), key=lambda s: s["mean_step_s"])
    steps = args.warmup + 1 + args.after
    r = _run(f"{name} rebalance=once", [*emu, "split.rebalance=once", f"split.rebalance_warmup_steps={args.warmup}",
                                         f"split.rebalance_min_gain={args.min_gain}", f"train.steps={steps}"],
             root / "rebalance", args)
    recs = r["summary"]["rebalances"]
    moved = recs[0] if recs else None
    after = [row["step_time_s"] for row in r["rows"][args.warmup + 1:]]
    mean_after = sum(after) / len(after)
    one_off = (moved["plan_s"] + moved["migrate_s"]) if moved else 0.0
    gain_per_step = uniform["mean_step_s"] - mean_after
    return {
        "scenario": name, "emulation": emu, "grid_k_client0": grid, "grid_k_client1": grid1,
        "uniform": uniform, "static": list(static.values()), "oracle": oracle,
        "rebalance": {"final_partition": r["summary"]["final_partition"], "record": moved,
                      "mean_step_s_after_move": mean_after, "plan_s": moved["plan_s"] if moved else None,
                      "migrate_s": moved["migrate_s"] if moved else None,
                      "steps_to_amortise": (one_off / gain_per_step) if gain_per_step > 0 else None,
                      "final_loss": r["summary"]["final_loss"], "cpu_s_foreign": r["cpu_s_foreign"],
                      "step_times_s": [row["step_time_s"] for row in r["rows"]]},
        "speedup_vs_uniform": uniform["mean_step_s"] / mean_after,
        "vs_oracle": mean_after / oracle["mean_step_s"],
    }


def table(results: list[dict]) -> str:
    lines = ["| scenario (EMULATED) | uniform ms/step | oracle k (grid) | oracle ms/step | rebalance=once → k | "
             "ms/step after move | vs uniform | vs oracle | plan + migrate s | amortised in steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rb = r["rebalance"]
        ks = [sum(pq) for pq in rb["final_partition"]]
        one_off = (rb["plan_s"] or 0) + (rb["migrate_s"] or 0)
        amort = f"{rb['steps_to_amortise']:.1f}" if rb["steps_to_amortise"] is not None else "never"
        lines.append(f"| {r['scenario']} | {r['uniform']['mean_step_s'] * 1000:.0f} | {tuple(r['oracle']['k'])} | "
                     f"{r['oracle']['mean_step_s'] * 1000:.0f} | {tuple(ks)} | {rb['mean_step_s_after_move'] * 1000:.0f} | "
                     f"{r['speedup_vs_uniform']:.2f}x | {r['vs_oracle']:.2f} | {one_off:.2f} | {amort} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/rebalance.json")
    ap.add_argument("--grid", default="2,10,18,26,29", help="k = p + q values of client 0 for the static grid")
    ap.add_argument("--grid-client1", default="2,10", help="k values of client 1 (the EMULATED slow one: more "
                                                           "blocks only make it slower, measured at k = 10)")
    ap.add_argument("--steps", type=int, default=8, help="steps of each static run")
    ap.add_argument("--warmup", type=int, default=4, help="split.rebalance_warmup_steps of run (c)")
    ap.add_argument("--after", type=int, default=8, help="steps of run (c) after the move")
    ap.add_argument("--min-gain", type=float, default=1.05, help="split.rebalance_min_gain of run (c)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank (one device each)")
    ap.add_argument("--scenarios", default="0,1", help="indices into the scenarios, comma-separated")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--wait-quiet", type=float, default=60, help="wait up to this many s for an idle machine per run")
    args = ap.parse_args()
    ensure_smollm2()
    names = list(SCENARIOS)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedsea-rebalance-") as tmp:
        for i in (int(x) for x in args.scenarios.split(",")):
            results.append(run_scenario(names[i], SCENARIOS[names[i]], args, Path(tmp) / str(i)))
    out = {"benchmark": "rebalance", "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python benchmarks/rebalance.py " + " ".join(sys.argv[1:]),
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine_info(),
           "note": "heterogeneity is EMULATED (emulate.*: sleeps on the client ranks); each of the 3 ranks "
                   f"computes with {args.threads} thread(s), standing for alike devices", "results": results}
    path = REPO / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
