"""Split vs centralized training step: time per step and bytes on the wire against the minimum.

For each model this runs the real CLI twice with the same config (noise and LoRA at their
defaults): ``train.mode=centralized`` in one process, and ``train.mode=parallel`` under
``mpiexec -n clients+servers``. "Equal cores": centralized gets every core
(``OMP_NUM_THREADS=os.cpu_count()``); the split ranks share the same cores, with the CLI's own
default (OMP_NUM_THREADS removed from their environment): clients and servers take turns, so a
client rank gets ``cores // clients`` and a server rank ``cores // servers`` torch threads, at
least 1 (``fedsea_hpc.distributed.process.threads_for``). The thread counts used are written to
the JSON.

Minimum bytes per step: only the hidden states of the real tokens and their gradients must cross
the wire, in both directions: ``4 * sum_c sum(lengths_c) * H * itemsize`` (h_A up, h_B down,
dL/dh_B up, dL/dh_A down); the bytes ratio (target <= 1.05) is against this unpadded minimum. The
padded minimum ``4 * sum_c B_c * T_c * H * itemsize`` (what a wire carrying whole [B, T, H] batches
would need) is reported beside it. Batches of every step are reconstructed exactly with
``ClientData(...).batches()``, the same stream each client rank draws from (same files, client
index, tokenizer, seq_len and seed).

    python benchmarks/train_step.py --models tiny,smollm2 --out benchmarks/results/train_step.json
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
from _common import REPO, SMOLLM2_DIR, least_disturbed_run, machine_info, split_threads  # noqa: E402
from _common import ensure_smollm2 as _ensure_smollm2  # noqa: E402
from _common import mpiexec as _mpiexec  # noqa: E402

from fedsea_hpc.components.metrics import PHASES  # noqa: E402

WARMUP = 2  # the summary's mean_step_time_s excludes the first 2 steps; so do our phase means

# Per-model defaults; --steps/--seq-len/--micro-batch override them for every model.
MODELS = {
    "tiny": dict(overrides=["model.name_or_path=tiny"], steps=30, seq_len=128, micro_batch=8),
    "smollm2": dict(overrides=[f"model.name_or_path={SMOLLM2_DIR}", "split.head_layers=2",
                               "split.tail_layers=2"], steps=8, seq_len=128, micro_batch=4),
}


def minimum_bytes(overrides: list[str], steps: int) -> dict:
    """Per-step ``sum_c B_c * T_c`` and the minimum activation + gradient bytes, from the data."""
    import torch

    from fedsea_hpc.config import load_config
    from fedsea_hpc.data.dataset import ClientData
    from fedsea_hpc.data.tokenizer import load_tokenizer

    cfg = load_config(None, overrides)  # validate() fills data.train_files exactly as the CLI does
    m = cfg.model
    if m.name_or_path == "tiny":
        hidden = m.tiny_hidden_size
    else:
        hidden = json.loads((REPO / m.name_or_path / "config.json").read_text())["hidden_size"]
    itemsize = torch.empty(0, dtype=getattr(torch, m.dtype)).element_size()
    tok = load_tokenizer(m.name_or_path, cache_dir=m.cache_dir or None)
    n = cfg.topology.clients
    streams = [ClientData(cfg.data.train_files, c, n, tok, cfg.train.seq_len, cfg.run.seed)
               .batches(cfg.train.micro_batch_size) for c in range(n)]
    bt, real, tokens, samples, lengths_bytes = [], [], [], [], []
    for _ in range(steps):
        batches = [next(s) for s in streams]
        bt.append(sum(b.input_ids.shape[0] * b.input_ids.shape[1] for b in batches))
        real.append(sum(int(b.lengths.sum()) for b in batches))  # unpadded positions
        tokens.append(sum(b.num_loss_tokens for b in batches))
        samples.append(sum(b.input_ids.shape[0] for b in batches))
        lengths_bytes.append(sum(b.input_ids.shape[0] * 8 for b in batches))  # int64 [B_c]
    padded = [4 * x * hidden * itemsize for x in bt]
    return {"hidden_size": hidden, "itemsize": itemsize, "sum_BT_per_step": bt,
            "sum_lengths_per_step": real,  # the tokens the wire carries (packed, no padding)
            "min_bytes_per_step": [4 * x * hidden * itemsize for x in real], "tokens_per_step": tokens,
            "samples_per_step": samples, "padded_min_bytes_per_step": padded,
            "lengths_bytes_per_step": lengths_bytes, "train_files": cfg.data.train_files}


def _phase_means(rows: list[dict]) -> dict:
    steady = rows[min(WARMUP, len(rows) - 1):]
    return {p: sum(r["phase_s"][p] for r in steady) / len(steady) for p in PHASES}


def run_model(name: str, args, run_root: Path) -> dict:
    spec = MODELS[name]
    steps = args.steps or spec["steps"]
    seq_len = args.seq_len or spec["seq_len"]
    mb = args.micro_batch or spec["micro_batch"]
    world = args.clients + args.servers
    if name == "smollm2":
        _ensure_smollm2()
    common = spec["overrides"] + [
        f"train.steps={steps}", f"train.seq_len={seq_len}", f"train.micro_batch_size={mb}",
        f"topology.clients={args.clients}", f"topology.servers={args.servers}",
        "run.progress=false", f"run.log_every={max(1, steps // 5)}",
    ]
    ncpu = os.cpu_count() or 1
    out: dict = {"model": name, "steps": steps, "seq_len": seq_len, "micro_batch_size": mb,
                 "clients": args.clients, "servers": args.servers, "overrides": common, "runs": {}}
    modes = [("centralized", "centralized", 0), ("parallel", "parallel", 0)]
    if args.split_omp_threads:  # an extra, clearly labelled variant; the CLI default stays the headline
        modes.append((f"parallel_omp{args.split_omp_threads}", "parallel", args.split_omp_threads))
    for label, mode, omp in modes:
        odir = run_root / name / label
        ov = common + [f"train.mode={mode}", f"run.output_dir={odir}"]
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        base = [sys.executable, "-m", "fedsea_hpc", "train", *ov]
        if mode == "centralized":
            env["OMP_NUM_THREADS"] = str(ncpu)
            cmd, threads, ranks = base, ncpu, 1
        else:
            cmd, threads, ranks = [_mpiexec(), "-n", str(world), *base], split_threads(args.clients, args.servers), world
            if omp > 0:
                env["OMP_NUM_THREADS"], threads = str(omp), omp
        def finish(run: dict, odir: Path, name=name, label=label) -> None:
            summary = json.loads((odir / "summary.json").read_text())
            rows = [json.loads(line) for line in (odir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            run.update({
                "median_step_time_s": statistics.median(r["step_time_s"] for r in rows[WARMUP:] or rows),
                "summary": summary, "phase_means_s": _phase_means(rows),
                "per_step": [{k: r[k] for k in ("step", "step_time_s", "bytes_sent", "bytes_sent_by_kind",
                                                 "phase_s", "samples", "tokens")} for r in rows],
            })
            print(f"[{name}/{label}] {summary['mean_step_time_s'] * 1e3:.1f} ms/step (median "
                  f"{run['median_step_time_s'] * 1e3:.1f}), final loss {summary['final_loss']:.4f} "
                  f"({run['process_wall_s']:.0f}s; other processes used {run['foreign_cpu_frac']:.0%} of the "
                  f"cores meanwhile)", flush=True)

        best = least_disturbed_run(f"{name}/{label}", cmd, env, odir, args,
                                   {"ranks": ranks, "torch_threads_per_rank": threads}, finish)
        out["runs"][label] = best

    mins = minimum_bytes(common, steps)
    c, p = out["runs"]["centralized"]["summary"], out["runs"]["parallel"]["summary"]
    # Sanity: the reconstruction must see the very batches the runs saw.
    recon_ok = (p["tokens_total"] == sum(mins["tokens_per_step"]) == c["tokens_total"]
                and p["samples_total"] == sum(mins["samples_per_step"]))
    kinds = p["bytes_sent_by_kind"]
    min_total = sum(mins["min_bytes_per_step"])
    padded_total = sum(mins["padded_min_bytes_per_step"])
    act_grad = kinds["activation"] + kinds["gradient"]
    out["result"] = {
        "split_ms_per_step": p["mean_step_time_s"] * 1e3,
        "centralized_ms_per_step": c["mean_step_time_s"] * 1e3,
        "time_ratio": p["mean_step_time_s"] / c["mean_step_time_s"],
        "time_ratio_target": 1.2,
        "split_median_ms_per_step": out["runs"]["parallel"]["median_step_time_s"] * 1e3,
        "centralized_median_ms_per_step": out["runs"]["centralized"]["median_step_time_s"] * 1e3,
        "median_time_ratio": out["runs"]["parallel"]["median_step_time_s"]
        / out["runs"]["centralized"]["median_step_time_s"],
        "wire_bytes_per_step": p["bytes_sent_total"] / steps,
        "wire_bytes_per_step_by_kind": {k: v / steps for k, v in kinds.items()},
        "min_bytes_per_step": min_total / steps,  # real tokens only
        "padded_min_bytes_per_step": padded_total / steps,
        "bytes_ratio": p["bytes_sent_total"] / min_total,
        "bytes_ratio_vs_padded_min": p["bytes_sent_total"] / padded_total,
        "payload_act_grad_ratio": act_grad / min_total,
        "padding_fraction_of_padded_min": 1 - sum(mins["sum_lengths_per_step"]) / sum(mins["sum_BT_per_step"]),
        "bytes_ratio_target": 1.05,
        "final_loss": {"centralized": c["final_loss"], "parallel": p["final_loss"]},
        "reconstruction_matches_runs": recon_ok,
    }
    out["minimum"] = mins
    return out


def _thr(t) -> str:
    return "/".join(f"{k} {v}" for k, v in t.items()) if isinstance(t, dict) else str(t)


def _table(results: list[dict]) -> str:
    mib = 2**20
    lines = ["| model | mode | ms/step | ratio | median ms/step (ratio) | MiB/step | unpadded min MiB/step "
             "| bytes ratio | padded min MiB/step | final loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["result"]
        lines.append(f"| {r['model']} | centralized (1 proc, {r['runs']['centralized']['torch_threads_per_rank']} thr) "
                     f"| {s['centralized_ms_per_step']:.1f} | 1.00 | {s['centralized_median_ms_per_step']:.1f} (1.00) "
                     f"| 0 | - | - | - | {s['final_loss']['centralized']:.4f} |")
        c = r["runs"]["centralized"]
        for label, run in r["runs"].items():
            if label == "centralized":
                continue
            ps = run["summary"]
            lines.append(f"| {r['model']} | {label} ({run['ranks']} ranks, {_thr(run['torch_threads_per_rank'])} thr each) "
                         f"| {ps['mean_step_time_s'] * 1e3:.1f} "
                         f"| {ps['mean_step_time_s'] / c['summary']['mean_step_time_s']:.2f} "
                         f"| {run['median_step_time_s'] * 1e3:.1f} "
                         f"({run['median_step_time_s'] / c['median_step_time_s']:.2f}) "
                         f"| {ps['bytes_sent_total'] / r['steps'] / mib:.3f} | {s['min_bytes_per_step'] / mib:.3f} "
                         f"| {ps['bytes_sent_total'] / (s['min_bytes_per_step'] * r['steps']):.4f} "
                         f"| {s['padded_min_bytes_per_step'] / mib:.3f} | {ps['final_loss']:.4f} |")
    return "\n".join(lines)


def _phase_table(results: list[dict]) -> str:
    lines = ["| model | mode | " + " | ".join(p.removesuffix("_s") for p in PHASES) + " |",
             "|---|---|" + "---:|" * len(PHASES)]
    for r in results:
        for mode, run in r["runs"].items():
            lines.append(f"| {r['model']} | {mode} | "
                         + " | ".join(f"{run['phase_means_s'][p] * 1e3:.1f}" for p in PHASES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0 = per-model default: tiny 30, smollm2 8)")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=0, help="0 = per-model default (128)")
    ap.add_argument("--micro-batch", type=int, default=0, help="0 = per-model default (tiny 8, smollm2 4)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each run wait up to this many seconds for other processes to leave the cores idle "
                         "(0 = don't wait); foreign CPU use during each run is recorded either way")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="rerun a mode when other processes used more than this fraction of the cores during it")
    ap.add_argument("--retries", type=int, default=2, help="reruns per mode when the machine was busy (keeps the "
                                                           "least disturbed run)")
    ap.add_argument("--split-omp-threads", type=int, default=0,
                    help="also run the split job with OMP_NUM_THREADS=N on every rank (a labelled extra variant)")
    ap.add_argument("--run-dir", default="", help="where run outputs go (default: a temp dir, deleted)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")

    tmp = None if args.run_dir else tempfile.TemporaryDirectory(prefix="fedsea_bench_")
    run_root = Path(args.run_dir or tmp.name).resolve()
    try:
        results = [run_model(m, args, run_root) for m in names]
    finally:
        if tmp is not None:
            tmp.cleanup()
    doc = {
        "benchmark": "train_step",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "note": "centralized: 1 process with OMP_NUM_THREADS=cpu_count; parallel: clients+servers ranks on the "
                "same cores with the CLI's thread default: a client rank gets cores // clients, a server rank "
                "cores // servers torch threads (they take turns). Times are mean over steps > 2.",
        "results": results,
    }
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(_table(results))
    print()
    print("mean phase times (ms/step, max over ranks, steps > 2):")
    print(_phase_table(results))
    for r in results:
        if not r["result"]["reconstruction_matches_runs"]:
            print(f"WARNING: {r['model']}: reconstructed batches do not match the runs' tokens/samples")
        for mode, run in r["runs"].items():
            if run["foreign_cpu_frac"] > 0.1:
                print(f"WARNING: {r['model']}/{mode}: other processes used {run['foreign_cpu_frac']:.0%} of the "
                      "cores during the run; its times are inflated")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
