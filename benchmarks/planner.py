"""How long the partition planner takes: L = 30 blocks, 2 to 16 clients, random costs.

Pure arithmetic (no ranks launched): for each size it plans ``--repeats`` random cost vectors
(seeded) and reports the median and worst wall time and the candidates scored; prints a markdown
table and writes JSON.

    python benchmarks/planner.py --out benchmarks/results/planner.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedsea_hpc.adapt.planner import Costs, Limits, plan  # noqa: E402


def random_costs(rng: np.random.Generator, clients: int) -> Costs:
    return Costs(client_block_s=rng.uniform(0.001, 0.05, clients), client_fixed_s=rng.uniform(0, 0.1, clients),
                 wire_s=rng.uniform(0, 0.05, clients), server_block_s=rng.uniform(0.001, 0.02, clients),
                 client_fixed_mb=rng.uniform(50, 100, clients), client_block_mb=rng.uniform(5, 20, clients))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/planner.json")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    rows = []
    for clients, servers, mode, assignment in [(2, 1, "parallel", "round_robin"), (4, 1, "parallel", "round_robin"),
                                               (8, 2, "parallel", "balanced"), (16, 1, "parallel", "round_robin"),
                                               (16, 4, "parallel", "balanced"), (16, 1, "sequential", "round_robin")]:
        rng = np.random.default_rng(clients * 100 + servers)
        limits = Limits(args.layers, min_head_layers=2, min_tail_layers=1)
        times, scored = [], []
        for _ in range(args.repeats):
            costs = random_costs(rng, clients)
            t0 = time.perf_counter()
            got = plan(costs, limits, [(2, 1)] * clients, servers=servers, mode=mode, assignment=assignment)
            times.append(time.perf_counter() - t0)
            scored.append(got.evaluated)
        rows.append({"layers": args.layers, "clients": clients, "servers": servers, "mode": mode,
                     "assignment": assignment, "median_ms": 1e3 * statistics.median(times),
                     "max_ms": 1e3 * max(times), "candidates_scored_max": max(scored)})
    print("| L | clients | servers | mode | assignment | median ms | max ms | candidates scored (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['clients']} | {r['servers']} | {r['mode']} | {r['assignment']} | "
              f"{r['median_ms']:.1f} | {r['max_ms']:.1f} | {r['candidates_scored_max']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                               "repeats": args.repeats, "python": platform.python_version(),
                               "processor": platform.processor(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
