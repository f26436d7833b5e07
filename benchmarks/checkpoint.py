"""What a checkpoint costs: size, save time, load time, and how a save compares with writing its bytes.

SmolLM2-135M (30 blocks), 2 clients + 1 server under ``mpiexec``, ``train.mode=parallel``,
``deepspeed.zero_stage=--zero``. Per fine-tuning kind (LoRA with the default ``peft.*``; full,
``peft.lora_r=0``): one run of ``--steps`` steps with ``run.save_every=--every`` (each save is
timed by the run itself, ``summary.json``'s ``checkpoints.saved``: ``save_s`` is what training
waits for, the snapshot into memory on every rank and any wait for the previous save still
being written), then a fresh launch resumed from the first checkpoint (``checkpoints.load_s``:
the slowest rank's ``load_checkpoint``, after its files were checked by size and CRC-32).

Saves are asynchronous: the files are written by a background thread while the next steps run.
The yardstick for the stall is ``write_s``, the time to write the same number of bytes with
plain ``write`` calls into one file in the same directory, without fsync (as the save, which
leaves flushing to the OS; only the small marker is synced), from memory that is already
serialised. ``stall / write`` below 1 means a save holds training up for less than writing its
bytes would. The step time is the mean over the run, saves included (the background writes
share the cores with training).

    python benchmarks/checkpoint.py --out benchmarks/results/checkpoint.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOLLM2_DIR, ensure_smollm2, machine_info, mpiexec, run_cmd, tail  # noqa: E402

KINDS = {"LoRA": [], "full": ["peft.lora_r=0"]}


def _run(tag: str, overrides: list[str], out: Path, args) -> dict:
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "fedsea_hpc", "train", f"model.name_or_path={SMOLLM2_DIR}",
           "topology.clients=2", "topology.servers=1", f"deepspeed.zero_stage={args.zero}",
           f"train.seq_len={args.seq_len}", f"train.steps={args.steps}", "run.progress=false",
           f"run.output_dir={out}", *overrides]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    print(f"[{tag}] {' '.join(overrides)}", flush=True)
    log = out.parent / f"{out.name}.log"
    for _attempt in range(3):  # a rendezvous port taken between pick and bind: retry
        rc, wall, _, _ = run_cmd(cmd, env, args.timeout, log)
        if rc == 0 or "EADDRINUSE" not in tail(log):
            break
    if rc != 0:
        raise RuntimeError(f"{tag} exited {rc}; log tail:\n{tail(log)}")
    return json.loads((out / "summary.json").read_text())


def write_s(nbytes: int, directory: Path, repeats: int = 3) -> float:
    """Best of ``repeats``: seconds to write ``nbytes`` from memory into one new file (no fsync)."""
    buf = os.urandom(min(nbytes, 64 << 20))
    best = float("inf")
    for _ in range(repeats):
        path = directory / ".write-probe"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                n = min(left, len(buf))
                f.write(buf[:n] if n < len(buf) else buf)
                left -= n
        best = min(best, time.perf_counter() - t0)
        path.unlink()
    return best


def measure(kind: str, overrides: list[str], root: Path, args) -> dict:
    out = root / kind
    s = _run(f"{kind}: save every {args.every}", [*overrides, f"run.save_every={args.every}",
                                  f"run.keep_checkpoints={max(1, args.steps // args.every)}"], out, args)
    saved = s["checkpoints"]["saved"]
    first = out / "checkpoints" / f"step-{saved[0]['step']:08d}"
    r = _run(f"{kind}: resume", [*overrides, f"run.resume={first}"], root / f"{kind}-resumed", args)
    nbytes = saved[0]["bytes"]
    w = write_s(nbytes, out / "checkpoints")
    save = sum(x["save_s"] for x in saved) / len(saved)
    return {"kind": kind, "overrides": overrides, "bytes": nbytes, "saves": saved, "mean_save_s": save,
            "max_waited_for_previous_s": max(x["waited_for_previous_s"] for x in saved),
            "load_s": r["checkpoints"]["load_s"], "write_s": w, "save_over_write": save / w,
            "mean_step_s": s["mean_step_time_s"], "resumed_losses_equal": r["losses"] == s["losses"]}


def table(results: list[dict]) -> str:
    lines = ["| fine-tuning | checkpoint MiB | stall per save s | of it waiting for the previous s | load s | "
             "write the bytes s | stall / write | step s (for scale) | resumed losses equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['bytes'] / 2**20:.1f} | {r['mean_save_s']:.2f} | "
                     f"{r['max_waited_for_previous_s']:.2f} | {r['load_s']:.2f} | "
                     f"{r['write_s']:.2f} | {r['save_over_write']:.2f}x | {r['mean_step_s']:.2f} | "
                     f"{'yes' if r['resumed_losses_equal'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/checkpoint.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=2, help="run.save_every")
    ap.add_argument("--zero", type=int, default=2, help="deepspeed.zero_stage")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--kinds", default="LoRA,full")
    ap.add_argument("--workdir", help="where the runs write (default: a temporary directory, removed)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    ensure_smollm2()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fedsea-ckpt-bench-"))
    try:
        results = [measure(k, KINDS[k], root, args) for k in args.kinds.split(",")]
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    doc = {"benchmark": "checkpoint", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/checkpoint.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
           "setup": {"model": "SmolLM2-135M-Instruct", "clients": 2, "servers": 1, "zero_stage": args.zero,
                     "steps": args.steps, "save_every": args.every, "seq_len": args.seq_len,
                     "filesystem_of_runs": str(root)},
           "results": results, "table": table(results)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
