"""A fine-tune that visibly works: the digit-code task on SmolLM2-135M, base vs each silo alone vs
federated split vs centralized, scored on the same held-out eval sets.

The task (``fedsea_hpc.data.make_digit_code``): encode a number with a secret digit-to-letter code.
Non-IID over 3 clients: client 0's numbers use only the digits 0-3, client 1's 4-6, client 2's
7-9; each client's eval file holds held-out numbers of its own slice, so the union of the eval
sets (the *shared* eval set) covers every digit. Every run goes through the real entry point with
the same model, data, LoRA, steps, batch and seed:

- ``base``: ``fedsea eval`` of the base model (no adapters);
- ``local``: ``fedsea train train.mode=local`` (each client trains its own full copy on its own
  data only), then ``fedsea eval eval.adapters_dir=RUN/adapters/local<i>`` for each silo: silo i's
  model on the shared eval set;
- ``federated``: ``mpiexec -n 4 fedsea train`` (``parallel``: 3 clients + 1 DeepSpeed server rank,
  LoRA, the default activation noise, FedAvg of the client parts every step), then ``fedsea eval``
  of its ``adapters/``;
- ``centralized``: ``fedsea train train.mode=centralized`` (one process, the unsplit model on the
  union of the clients' batches), then ``fedsea eval`` of ``adapters/centralized``.

Every ``fedsea eval`` runs split (``mpiexec -n 4``, the generation protocol, no noise), so each
client scores its own slice of the shared set: eval loss (token-weighted) and, on greedy answers,
exact match and ROUGE-L F1 (the README's normalisation).

    python benchmarks/finetune.py --out benchmarks/results/finetune.json

prints the table and writes the JSON (every run's command, wall time, losses, scores; the machine).
Defaults take about 25 minutes on 2 idle cores.
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
CLIENTS = 3
ALL_LINEARS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def common_overrides(args, data: dict) -> list[str]:
    return [f"model.name_or_path={SMOLLM2_DIR}", f"topology.clients={CLIENTS}", "topology.servers=1",
            f"data.train_files=[{','.join(data['train'])}]", f"data.eval_files=[{','.join(data['eval'])}]",
            f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", f"train.seq_len={args.seq_len}",
            f"train.lr={args.lr}", f"train.eval_every={args.eval_every}", f"peft.target_modules={ALL_LINEARS}",
            f"run.seed={args.seed}", f"generate.max_new_tokens={args.max_new_tokens}",
            f"generate.batch_size={args.gen_batch}", f"eval.max_records={args.max_records}",
            "run.progress=false", "run.log_every=25"]


class Runner:
    def __init__(self, args, tmp: Path, data: dict):
        self.args, self.tmp, self.common = args, tmp, common_overrides(args, data)
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME="lo")
        self.env.pop("OMP_NUM_THREADS", None)  # the CLI's per-role thread default, as users run it

    def run(self, name: str, job: str, ranks: int, extra: list[str]) -> tuple[Path, dict]:
        odir = self.tmp / name
        odir.mkdir(parents=True)
        launch = [_mpiexec(), "-n", str(ranks)] if ranks > 1 else []
        cmd = [*launch, sys.executable, "-m", "fedsea_hpc", job, "--config", CONFIG, *self.common, *extra,
               f"run.output_dir={odir}"]
        print(f"[{name}] {' '.join(cmd[-len(extra) - 1:])}", flush=True)
        rc, wall, _, foreign = run_cmd(cmd, self.env, self.args.timeout, odir / "log.txt")
        if rc != 0:
            raise RuntimeError(f"{name} exited {rc} after {wall:.0f}s; log tail:\n{tail(odir / 'log.txt')}")
        shown = [c if not c.startswith(str(self.tmp)) else c.replace(str(self.tmp), "$TMP") for c in cmd]
        return odir, {"command": " ".join(x.replace(str(self.tmp), "$TMP") for x in shown),
                      "process_wall_s": round(wall, 1), "cpu_s_foreign": round(foreign, 1)}

    def evaluate(self, name: str, adapters: str | Path) -> dict:
        odir, info = self.run(name, "eval", CLIENTS + 1, [f"eval.adapters_dir={adapters}"])
        s = json.loads((odir / "eval_summary.json").read_text())
        o = s["overall"]
        per = [{k: p[k] for k in ("client", "eval_loss", "exact_match", "rouge_l_f1", "scored")} for p in s["per_client"]]
        row = {"eval_loss": o["eval_loss"], "eval_ppl": o["eval_ppl"], "exact_match": o["exact_match"],
               "rouge_l_f1": o["rouge_l_f1"], "scored": o["scored"], "per_client": per, "eval_run": info,
               "examples": examples(odir)}
        print(f"  {name}: eval loss {row['eval_loss']:.3f}  EM {row['exact_match']:.3f}  "
              f"ROUGE-L {row['rouge_l_f1']:.3f}  ({row['scored']} answers)  [{info['process_wall_s']:.0f}s]", flush=True)
        return row

    def train(self, name: str, ranks: int, extra: list[str]) -> tuple[Path, dict]:
        odir, info = self.run(name, "train", ranks, extra)
        s = json.loads((odir / "summary.json").read_text())
        losses = s["losses"]
        info.update({"first_loss": losses[0], "last_loss": losses[-1], "mean_step_time_s": s.get("mean_step_time_s"),
                     "train_eval_loss": s.get("eval_loss"), "evals": s.get("evals")})
        for k in ("eval_model_loss", "eval_matrix"):
            if k in s:
                info[k] = s[k]
        print(f"  {name}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval loss in training "
              f"{info['train_eval_loss']}  [{info['process_wall_s']:.0f}s]", flush=True)
        return odir, info


def examples(odir: Path, n: int = 2) -> list[dict]:
    """The first ``n`` answers of each client, to show what the scores mean."""
    out = []
    for p in sorted(odir.glob("eval_predictions-client*.jsonl")):
        for line in p.read_text().splitlines()[:n]:
            r = json.loads(line)
            out.append({"client": int(p.stem.rsplit("client", 1)[1]), "prompt": r["prompt"],
                        "reference": r["reference"], "completion": r["completion"], "exact_match": r["exact_match"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--train", type=int, default=300, help="training records per client")
    ap.add_argument("--eval", type=int, default=40, help="eval records per client")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per client per step")
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval-every", type=int, default=50, help="train.eval_every of the training runs")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--gen-batch", type=int, default=8, help="generate.batch_size of the eval runs")
    ap.add_argument("--max-records", type=int, default=0, help="eval.max_records (0 = every eval record)")
    ap.add_argument("--seed", type=int, default=0, help="data and run seed")
    ap.add_argument("--only", default="base,local,federated,centralized", help="which runs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--keep", default="", help="keep every run's output dir under this dir (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    args = ap.parse_args(argv)
    ensure_smollm2()
    from fedsea_hpc.data.make_digit_code import CODE, SLICES, make

    only = set(args.only.split(","))
    out = Path(args.out) if os.path.isabs(args.out) else REPO / args.out
    with tempfile.TemporaryDirectory(prefix="fedsea_finetune_") as t:
        tmp = Path(args.keep).resolve() if args.keep else Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        paths = make(str(tmp / "data"), args.train, args.eval, args.seed)
        data = {"train": paths[:CLIENTS], "eval": paths[CLIENTS:]}
        r = Runner(args, tmp, data)
        rows: dict = {}
        if "base" in only:
            rows["base"] = {"what": "the base model, no fine-tuning", **r.evaluate("base-eval", "")}
        if "local" in only:
            odir, info = r.train("local", 1, ["train.mode=local"])
            silos = [r.evaluate(f"local{i}-eval", odir / "adapters" / f"local{i}") for i in range(CLIENTS)]
            rows["local"] = {"what": "each client alone: its own full model trained on its own data only",
                             "train_run": info, "silos": silos,
                             "best_silo_exact_match": max(s["exact_match"] for s in silos),
                             "mean_silo_exact_match": sum(s["exact_match"] for s in silos) / CLIENTS,
                             "best_silo_eval_loss": min(s["eval_loss"] for s in silos)}
        if "federated" in only:
            odir, info = r.train("federated", CLIENTS + 1, ["train.mode=parallel"])
            rows["federated"] = {"what": "federated split (parallel, 3 clients + 1 DeepSpeed server rank, LoRA, "
                                         "default activation noise, FedAvg of client parts every step)",
                                 "train_run": info, **r.evaluate("federated-eval", odir / "adapters")}
        if "centralized" in only:
            odir, info = r.train("centralized", 1, ["train.mode=centralized"])
            rows["centralized"] = {"what": "centralized: one process, the unsplit model on the union of the clients' batches",
                                   "train_run": info, **r.evaluate("centralized-eval", odir / "adapters" / "centralized")}
    claims = check_claims(rows)
    from fedsea_hpc.config.schema import Config

    cfg = Config()
    result = {"what": __doc__.split("\n")[0],
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "config": CONFIG,
              "task": {"generator": "fedsea_hpc.data.make_digit_code", "code": CODE, "client_digits": list(SLICES),
                       "train_per_client": args.train, "eval_per_client": args.eval, "seed": args.seed},
              "settings": {"steps": args.steps, "micro_batch_per_client": args.micro_batch, "seq_len": args.seq_len,
                           "lr": args.lr, "lora_r": 8, "lora_targets": ALL_LINEARS, "split": "p = q = 2",
                           "noise": f"{cfg.privacy.noise_mode} noise_std={cfg.privacy.noise_std} (federated training "
                                    "only; evaluation without noise)",
                           "max_new_tokens": args.max_new_tokens, "decoding": "greedy"},
              "overrides": r.common, "machine": machine_info(), "rows": rows, "claims": claims}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    for c in claims:
        print(f"- {c['claim']}: {'yes' if c['holds'] else 'NO'} ({c['numbers']})")
    print(f"wrote {out}")
    return 0


def check_claims(rows: dict) -> list[dict]:
    """The three statements of the README, each with its numbers (None where a run is missing)."""
    out = []
    b, lo, f, c = (rows.get(k) for k in ("base", "local", "federated", "centralized"))
    if b and f:
        out.append({"claim": "fine-tuning raises exact match well above the base (federated EM - base EM >= 0.5)",
                    "holds": f["exact_match"] - b["exact_match"] >= 0.5,
                    "numbers": f"base {b['exact_match']:.3f}, federated {f['exact_match']:.3f}"})
    if lo and f:
        out.append({"claim": "federated beats every silo alone on the shared eval set (exact match and eval loss)",
                    "holds": f["exact_match"] > lo["best_silo_exact_match"] and f["eval_loss"] < lo["best_silo_eval_loss"],
                    "numbers": f"best silo EM {lo['best_silo_exact_match']:.3f} / loss {lo['best_silo_eval_loss']:.3f}, "
                               f"federated EM {f['exact_match']:.3f} / loss {f['eval_loss']:.3f}"})
    if c and f:
        gap = c["exact_match"] - f["exact_match"]
        out.append({"claim": "federated within 0.10 exact match of centralized",
                    "holds": gap <= 0.10, "gap": gap,
                    "numbers": f"centralized {c['exact_match']:.3f}, federated {f['exact_match']:.3f}, gap {gap:+.3f}"})
    return out


def markdown(result: dict) -> str:
    lines = ["| run | eval loss (shared set) | exact match | ROUGE-L F1 | training wall s |",
             "|---|---:|---:|---:|---:|"]

    def line(name, r, wall):
        lines.append(f"| {name} | {r['eval_loss']:.3f} | {r['exact_match']:.3f} | {r['rouge_l_f1']:.3f} | {wall} |")

    rows = result["rows"]
    if "base" in rows:
        line("base model", rows["base"], "–")
    if "local" in rows:
        for i, s in enumerate(rows["local"]["silos"]):
            digits = result["task"]["client_digits"][i]
            line(f"client {i} alone (digits {digits})", s,
                 f"{rows['local']['train_run']['process_wall_s']:.0f} (all 3)" if i == 0 else "")
    for k, name in (("federated", "federated split"), ("centralized", "centralized")):
        if k in rows:
            line(name, rows[k], f"{rows[k]['train_run']['process_wall_s']:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
