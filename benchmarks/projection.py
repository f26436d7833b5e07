"""The dedicated-device projection against a real run with a core per rank.

``fedsea report --project`` (fedsea_hpc/study/project.py) predicts, from a traced run, the step
time with one device per rank. It can be checked where the machine has a core per rank: 1
client + 1 server on 2 cores, one torch thread each. Per model and repeat, two traced runs of
the same job:

* **dedicated**: the two ranks on the two cores (``OMP_NUM_THREADS=1``): the measurement the
  projection must match;
* **oversubscribed**: the same job with both ranks on one core (``taskset -c 0``), as a study
  on a machine with fewer cores than ranks is run; its projection is the prediction.

Reported: the dedicated run's measured step time, the projection from the oversubscribed run
(the use), the projection from the dedicated run itself (the replay alone), and their errors.
Target: the prediction within 15 % of the measurement. Steps after the first two.

    python benchmarks/projection.py --out benchmarks/results/projection.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SMOLLM2_DIR, ensure_smollm2, machine_info, mpiexec, run_cmd, tail, wait_quiet  # noqa: E402

MODELS = {
    "tiny": (["model.name_or_path=tiny"], 30),
    "smollm2": ([f"model.name_or_path={SMOLLM2_DIR}", "train.seq_len=128", "train.micro_batch_size=4"], 8),
}


def one_run(model: str, how: str, out: Path, steps: int, args) -> dict:
    from fedsea_hpc.study.project import project_run

    extra, _ = MODELS[model]
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "fedsea_hpc", "train", *extra, "topology.clients=1",
           "topology.servers=1", f"train.steps={steps}", "run.trace=true", "run.progress=false",
           "run.log_every=1000", f"run.output_dir={out}"]
    if how == "oversubscribed":
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    print(f"[{model}/{how}] {' '.join(cmd)}", flush=True)
    rc, wall, _, foreign = run_cmd(cmd, env, args.timeout, out.parent / f"{out.name}.log")
    if rc != 0:
        raise RuntimeError(f"{model}/{how} exited {rc}; log tail:\n{tail(out.parent / f'{out.name}.log')}")
    p = project_run(out)
    print(f"  measured {p['measured_mean_step_s'] * 1e3:.1f} ms/step, projected {p['projected_mean_step_s'] * 1e3:.1f} "
          f"ms/step (link: {p['link']['source']})", flush=True)
    return {"command": cmd, "omp_num_threads": 1, "process_wall_s": wall, "foreign_cpu_s": foreign,
            "measured_mean_step_s": p["measured_mean_step_s"], "projected_mean_step_s": p["projected_mean_step_s"],
            "measured_step_s": p["measured_step_s"], "projected_step_s": p["projected_step_s"], "link": p["link"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-quiet", type=float, default=20.0, help="wait up to this long for an idle machine")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default="benchmarks/results/projection.json")
    args = ap.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("projection.py: needs 2 cores (a core per rank for the dedicated runs)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "smollm2" in models:
        ensure_smollm2()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedsea_proj_") as tmp:
        for model in models:
            steps = MODELS[model][1]
            runs = {"dedicated": [], "oversubscribed": []}
            for i in range(args.repeats):  # interleaved: a drift of the machine hits both alike
                for how in runs:
                    runs[how].append(one_run(model, how, Path(tmp) / f"{model}-{how}-{i}", steps, args))
            measured = statistics.fmean(r["measured_mean_step_s"] for r in runs["dedicated"])
            predicted = statistics.fmean(r["projected_mean_step_s"] for r in runs["oversubscribed"])
            replayed = statistics.fmean(r["projected_mean_step_s"] for r in runs["dedicated"])
            results[model] = {
                "steps": steps, "runs": runs,
                "dedicated_measured_step_s": measured,
                "oversubscribed_measured_step_s": statistics.fmean(r["measured_mean_step_s"] for r in runs["oversubscribed"]),
                "projected_from_oversubscribed_step_s": predicted,
                "projected_from_dedicated_step_s": replayed,
                "error_from_oversubscribed": predicted / measured - 1,
                "error_from_dedicated": replayed / measured - 1,
            }
    doc = {"benchmark": "projection", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
           "job": "1 client + 1 server, parallel, defaults otherwise; OMP_NUM_THREADS=1", "target": 0.15,
           "label": "projected_* values are a PROJECTION (fedsea report --project), the rest measured",
           "results": results}
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print("| model | measured, a core per rank (ms/step) | measured, both ranks on one core | PROJECTED from the "
          "one-core run | error | PROJECTED from the two-core run | error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, r in results.items():
        print(f"| {model} | {r['dedicated_measured_step_s'] * 1e3:.1f} | {r['oversubscribed_measured_step_s'] * 1e3:.1f} "
              f"| {r['projected_from_oversubscribed_step_s'] * 1e3:.1f} | {r['error_from_oversubscribed']:+.1%} "
              f"| {r['projected_from_dedicated_step_s'] * 1e3:.1f} | {r['error_from_dedicated']:+.1%} |")
    print(f"\n(mean of {args.repeats} runs each; steps after the first two; wrote {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
