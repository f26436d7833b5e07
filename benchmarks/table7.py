"""The paper's Table 7 (appendix), ours: sequential vs client-batch vs server-hierarchical.

Runs the sweeps ``configs/sweeps/table7-<model>.yaml`` through the real tool (``fedsea sweep``,
whose closing report projects the traced runs as ``fedsea report --project`` does; a re-run
skips the points already done) and compares, per
model, the training time of every point on the same 96 samples: sequential (one server rank,
clients in turn), client-batch (``parallel``, one server rank), server-hierarchical
(``parallel``, one server rank per 2 clients; at 2 clients that is the client-batch job) for 2, 4
and 8 clients, and centralized. Each time is shown as a ratio to the model's own sequential
2-client run, beside the paper's (Llama-2-7B on GPUs) ratios to its own, and the same ratio per
training token (the shards, and so the 96 samples' lengths, differ with the client count).

* **measured**: the training loop's wall time (``summary.json`` ``wall_time_s``: every step,
  no set-up) here, every rank sharing this machine's cores (oversubscribed as soon as ranks >
  cores; labelled so);
* **projected**: the sum of the PROJECTED step times for one device per rank
  (``projection.json``, fedsea_hpc/study/project.py): each rank keeps its own CPU work, the waits
  for a core drop out.

    python benchmarks/table7.py --models tiny,smollm2 --out benchmarks/results/table7.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, ensure_smollm2, machine_info  # noqa: E402

# The paper's Table 7 (seconds; Llama-2-7B): the server-hierarchical and client-batch runs at
# 2, 4, 8 clients, sequential at 2, centralized.
PAPER = {("sequential", 2): 689.2, ("client-batch", 2): 630.0, ("client-batch", 4): 542.0, ("client-batch", 8): 489.0,
         ("server-hierarchical", 2): 348.0, ("server-hierarchical", 4): 173.5, ("server-hierarchical", 8): 86.4,
         ("centralized", None): 381.9}


def scheme(cfg: dict) -> tuple[str, int | None]:
    mode, clients, servers = cfg["train.mode"], cfg["topology.clients"], cfg["topology.servers"]
    if mode == "centralized":
        return "centralized", None
    if mode == "sequential":
        return "sequential", clients
    return ("client-batch" if servers == 1 else "server-hierarchical"), clients


def run_sweep(model: str, out: Path, timeout_s: float) -> None:
    grid = REPO / "configs" / "sweeps" / f"table7-{model}.yaml"
    cmd = [sys.executable, "-m", "fedsea_hpc", "sweep", "--grid", str(grid), "--out", str(out),
           "--point-timeout-s", str(timeout_s)]
    print(f"[table7] {' '.join(cmd)}", flush=True)
    # A failed point is in its run.json (the table says so); the sweep ends with the report, which
    # projects every run since the grid traces them (fedsea report --project).
    subprocess.run(cmd, cwd=REPO, check=False)
    if not (out / "results.json").is_file():
        raise RuntimeError(f"the sweep wrote no report into {out}")


def rows_of(out: Path) -> list[dict]:
    res = json.loads((out / "results.json").read_text())
    rows = []
    for p in res["points"]:
        name = p["point"].rsplit("/", 1)[-1]
        run = out / "points" / name / "r0"
        rec = {"point": name, "status": p["status"], "ranks": p["ranks"], **dict(zip(("scheme", "clients"), scheme(p["config"])))}
        if p["status"] == "done":
            s = json.loads((run / "summary.json").read_text())
            rec["measured_s"] = s["wall_time_s"]
            rec["samples"] = s["samples_total"]
            rec["tokens"] = s["tokens_total"]  # shards differ with the client count: so do the tokens
            proj = run / "projection.json"
            if proj.is_file():
                rec["projected_s"] = sum(json.loads(proj.read_text())["projected_step_s"])
        else:
            rec["error"] = p.get("error")
        rows.append(rec)
    batch2 = next((r for r in rows if (r["scheme"], r["clients"]) == ("client-batch", 2)), None)
    if batch2 is not None:  # one server rank per 2 clients at 2 clients is the client-batch job
        rows.append({**batch2, "scheme": "server-hierarchical", "same_job_as": "client-batch"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--runs", default="runs", help="where the sweep dirs go (runs/table7-<model>)")
    ap.add_argument("--point-timeout-s", type=float, default=1800.0)
    ap.add_argument("--out", default="benchmarks/results/table7.json")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "smollm2" in models:
        ensure_smollm2()
    cpus = len(os.sched_getaffinity(0))
    results = {}
    for model in models:
        out = (REPO / args.runs / f"table7-{model}").resolve()
        run_sweep(model, out, args.point_timeout_s)
        rows = rows_of(out)
        base = next((r for r in rows if (r["scheme"], r["clients"]) == ("sequential", 2) and "measured_s" in r), None)
        for r in rows:
            r["oversubscribed"] = bool(r["ranks"] and r["ranks"] > cpus)
            if base is not None and "measured_s" in r:
                per_token = base["tokens"] / r["tokens"]  # the same ratio per training token
                r["measured_ratio"] = r["measured_s"] / base["measured_s"]
                r["measured_ratio_per_token"] = r["measured_ratio"] * per_token
                if "projected_s" in r and "projected_s" in base:
                    r["projected_ratio"] = r["projected_s"] / base["projected_s"]
                    r["projected_ratio_per_token"] = r["projected_ratio"] * per_token
            paper = PAPER.get((r["scheme"], r["clients"]))
            if paper is not None:
                r["paper_s"], r["paper_ratio"] = paper, paper / PAPER[("sequential", 2)]
        results[model] = {"sweep_dir": str(out), "rows": rows}
    doc = {"benchmark": "table7", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
           "label": ("measured_*: this machine, ranks sharing its cores (oversubscribed where ranks > cores); "
                     "projected_*: a PROJECTION for one device per rank; paper_*: FedSEA-LLaMA Table 7 "
                     "(Llama-2-7B, GPUs)"),
           "results": results}
    dest = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(doc, indent=1) + "\n")
    for model, res in results.items():
        print(f"\n{model} (times for 96 samples; ratio = time / the same side's sequential 2-client time)")
        print("| scheme | clients | ranks | tokens | measured s | ratio (per token) | PROJECTED s, a device per rank "
              "| ratio (per token) | paper s | paper ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        order = {"sequential": 0, "client-batch": 1, "server-hierarchical": 2, "centralized": 3}
        for r in sorted(res["rows"], key=lambda r: (order[r["scheme"]], r["clients"] or 0)):
            if "measured_s" not in r:
                print(f"| {r['scheme']} | {r['clients'] or ''} | {r['ranks'] or ''} | | failed: {r.get('error')} "
                      "| | | | | |")
                continue

            def f(key, spec):
                return format(r[key], spec) if key in r else ""
            over = " (oversubscribed)" if r["oversubscribed"] else ""
            over += " (= client-batch)" if r.get("same_job_as") else ""
            print(f"| {r['scheme']} | {r['clients'] or ''} | {r['ranks']} | {r['tokens']} | {r['measured_s']:.1f}{over} "
                  f"| {f('measured_ratio', '.2f')} ({f('measured_ratio_per_token', '.2f')}) | {f('projected_s', '.1f')} "
                  f"| {f('projected_ratio', '.2f')} ({f('projected_ratio_per_token', '.2f')}) "
                  f"| {f('paper_s', '.1f')} | {f('paper_ratio', '.2f')} |")
    print(f"\nwrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
