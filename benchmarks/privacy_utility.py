"""Utility after a short fine-tune, on the privacy grid: what each noise setting costs in training.

``benchmarks/privacy.py`` measures the attack and a *frozen* model's loss under noise; a frozen
model cannot adapt to the noise, so that loss overstates the cost. This script runs the real
entry point (``mpiexec -n 3 fedsea train --config configs/smollm2.yaml``: SmolLM2-135M, LoRA,
2 clients + 1 server, the shipped corpus) for the same ``--steps`` at each (p, noise setting),
with the noise the product uses (OS entropy on each client), and records the training loss.
Utility = the mean loss of the last ``--tail`` steps; every row also gives the difference to the
noise-free run at the same p.

With ``--attack`` (default ``benchmarks/results/privacy.json``, if present) it joins each row to
the attack result of the same (p, mode, σ) and writes the privacy-utility table and plot:

    python benchmarks/privacy_utility.py --out benchmarks/results/privacy_utility.json

writes the JSON, ``privacy_utility.md`` and ``privacy_utility.png`` beside ``--out``. One run per
setting (the noise is fresh entropy, so a rerun differs by its sampling noise; the σ = 0 rows
show the run-to-run spread of the rest: none, they are deterministic).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SMOLLM2_DIR, ensure_smollm2, machine_info, run_cmd, tail  # noqa: E402
from _common import mpiexec as _mpiexec  # noqa: E402

CONFIG = "configs/smollm2.yaml"


def settings_of(args) -> list[tuple[str, float]]:
    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
    return [("absolute", s) for s in floats(args.sigmas)] + [("relative", s) for s in floats(args.relative)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", default="1,2,4", help="partition points (split.head_layers)")
    ap.add_argument("--sigmas", default="0,0.025", help="absolute noise stds")
    ap.add_argument("--relative", default="0.25,1,4", help="relative noise (x per-token RMS)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tail", type=int, default=5, help="utility = mean loss of the last this-many steps")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--attack", default="benchmarks/results/privacy.json", help="attack results to join")
    ap.add_argument("--out", default="benchmarks/results/privacy_utility.json")
    args = ap.parse_args(argv)
    ensure_smollm2()
    env = dict(os.environ, PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME="lo")
    env.pop("OMP_NUM_THREADS", None)
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedsea_privutil_") as tmp:
        for p in [int(x) for x in args.p.split(",")]:
            for mode, sigma in settings_of(args):
                odir = Path(tmp) / f"p{p}-{mode}-{sigma:g}"
                odir.mkdir(parents=True)
                # min_head_layers=1: p = 1 is on the grid, below the config's own bound (set from these results).
                overrides = [f"split.head_layers={p}", "split.min_head_layers=1", f"train.steps={args.steps}",
                             f"privacy.noise_mode={mode}", f"privacy.noise_std={sigma}",
                             f"model.name_or_path={SMOLLM2_DIR}", "run.progress=false", "run.log_every=10"]
                cmd = [_mpiexec(), "-n", "3", sys.executable, "-m", "fedsea_hpc", "train", "--config", CONFIG,
                       *overrides, f"run.output_dir={odir}"]
                rc, wall, _, foreign = run_cmd(cmd, env, args.timeout, odir / "log.txt")
                if rc != 0:
                    raise RuntimeError(f"p={p} {mode} {sigma} exited {rc}; log tail:\n{tail(odir / 'log.txt')}")
                s = json.loads((odir / "summary.json").read_text())
                losses = s["losses"]
                row = {"p": p, "mode": mode, "sigma": sigma, "overrides": overrides, "losses": losses,
                       "first_loss": losses[0], "utility_loss": sum(losses[-args.tail:]) / len(losses[-args.tail:]),
                       "process_wall_s": round(wall, 1), "cpu_s_foreign": round(foreign, 1)}
                rows.append(row)
                print(f"p={p} {mode} sigma={sigma:g}: loss {losses[0]:.3f} -> last-{args.tail} mean "
                      f"{row['utility_loss']:.3f}  [{wall:.0f}s]", flush=True)
    for r in rows:
        base = next((b for b in rows if b["p"] == r["p"] and b["sigma"] == 0), None)
        r["utility_loss_minus_noise_free"] = r["utility_loss"] - base["utility_loss"] if base else None
    attack_path = REPO / args.attack
    attack = json.loads(attack_path.read_text()) if attack_path.is_file() else None
    if attack:
        for r in rows:
            a = next((a for a in attack["rows"] if a["p"] == r["p"] and a["mode"] == r["mode"]
                      and a["sigma"] == r["sigma"]), None)
            if a:
                r["attack"] = {"sigma_over_rms": a["sigma_over_rms"], "frozen_lm_loss": a["utility_lm_loss"],
                               **{n: {"token_accuracy": v["token_accuracy"], "rouge_l_f1": v["rouge_l_f1"]}
                                  for n, v in a["attack"].items()}}
    result = {"what": ("training loss of a short LoRA fine-tune of SmolLM2-135M through the real split entry point "
                       "at each noise setting (utility), joined to the inversion attack of benchmarks/privacy.py"),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "config": CONFIG, "steps": args.steps, "tail": args.tail,
              "attack_source": args.attack if attack else None, "machine": machine_info(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    if attack:
        plot(result, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}")
    return 0


def markdown(result: dict) -> str:
    head = ["p", "mode", "σ", "σ / RMS(h_A)", "best attack acc", "best attack ROUGE-L",
            f"fine-tune loss (last {result['tail']} of {result['steps']} steps)", "Δ vs no noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in result["rows"]:
        a = r.get("attack")
        inv = [v for k, v in (a or {}).items() if isinstance(v, dict)]
        cells = [str(r["p"]), r["mode"], f"{r['sigma']:g}",
                 f"{a['sigma_over_rms']:.4f}" if a else "–",
                 f"{max(v['token_accuracy'] for v in inv):.3f}" if inv else "–",
                 f"{max(v['rouge_l_f1'] for v in inv):.3f}" if inv else "–",
                 f"{r['utility_loss']:.3f}",
                 f"{r['utility_loss_minus_noise_free']:+.3f}" if r["utility_loss_minus_noise_free"] is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in sorted({r["p"] for r in result["rows"]}):
        pts = [(r["utility_loss"], max(v["token_accuracy"] for v in r["attack"].values() if isinstance(v, dict)),
                f"{r['mode'][:3]} {r['sigma']:g}") for r in result["rows"] if r["p"] == p and r.get("attack")]
        if not pts:
            continue
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], label=f"p = {p}")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"utility: training loss after {result['steps']} LoRA steps with that noise (lower = better)")
    ax.set_ylabel("best inversion attack token accuracy (lower = more private)")
    ax.set_title("SmolLM2-135M: privacy vs utility per noise setting and split point p", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
