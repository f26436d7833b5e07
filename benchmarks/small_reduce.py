"""Small sums over gloo: ``dist.all_reduce`` (a ring) vs ``fedsea_hpc.distributed.reduce.sum_``
(one round trip: a star through the group's first rank, a swap for two ranks).

The sizes are the project's own: the per-step metrics row (60 float64, over the world), the tiny
model's client LoRA buffer (28,672 float32) and SmolLM2-135M's at p = q = 2 (491,520 float32),
both summed over the clients by FedSGD/FedAvg. Every rank of one ``mpiexec`` runs both, in turns,
after a warm-up; the table is the mean milliseconds per sum (rank 0's clock).

    python benchmarks/small_reduce.py --ranks 2,3 --out benchmarks/results/small_reduce.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info  # noqa: E402
from _common import mpiexec as _mpiexec  # noqa: E402

SIZES = [("metrics row", 60, "float64"), ("tiny client LoRA", 28672, "float32"),
         ("SmolLM2 client LoRA (p=q=2)", 491520, "float32")]


def _rank_main(out: str, iters: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    from fedsea_hpc.distributed import reduce

    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ways = {"dist.all_reduce (gloo ring)": lambda t: dist.all_reduce(t), "reduce.sum_": reduce.sum_}
    rows = []
    for name, n, dtype in SIZES:
        t = torch.ones(n, dtype=getattr(torch, dtype))
        for way, fn in ways.items():
            for _ in range(10):
                fn(t)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(t)
            ms = (time.perf_counter() - t0) / iters * 1000
            small = t.numel() * t.element_size() <= reduce.STAR_MAX_BYTES
            path = ("swap" if world == 2 else "star") if small else "dist.all_reduce"
            rows.append({"ranks": world, "buffer": name, "elements": n, "dtype": dtype, "way": way, "ms": ms,
                         "sum_path": path})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,3", help="comma list of world sizes")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/results/small_reduce.json")
    ap.add_argument("--_rank", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._rank:
        out, port = args._rank.split(",")
        _rank_main(out, args.iters, int(port))
        return 0
    rows = []
    for i, n in enumerate(int(x) for x in args.ranks.split(",")):
        part = Path(f"/tmp/fedsea-small-reduce-{os.getpid()}-{n}.json")
        cmd = [_mpiexec(), "-n", str(n), sys.executable, __file__, "--iters", str(args.iters),
               "--_rank", f"{part},{29700 + i}"]
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows += json.loads(part.read_text())
        part.unlink()
    print("| ranks | buffer | elements | dist.all_reduce ms | reduce.sum_ ms (its path) | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["way"] == "reduce.sum_":
            ring = next(x for x in rows if x["ranks"] == r["ranks"] and x["buffer"] == r["buffer"] and x is not r)
            print(f"| {r['ranks']} | {r['buffer']} | {r['elements']} | {ring['ms']:.3f} | {r['ms']:.3f} ({r['sum_path']}) | "
                  f"{ring['ms'] / r['ms']:.1f}x |")
    Path(args.out).write_text(json.dumps({
        "benchmark": "small_reduce", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/small_reduce.py " + " ".join(a for a in sys.argv[1:]),
        "machine": machine_info(), "note": "all ranks on this machine (loopback TCP), one torch thread each",
        "results": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
