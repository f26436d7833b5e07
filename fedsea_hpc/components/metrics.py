"""Rank 0's view of a run: metrics.jsonl (one object per optimizer step, and one per eval pass),
progress, summary.

An eval row (:mod:`fedsea_hpc.train.evaluation`) carries ``step`` (the steps done before it) and
``eval_loss``, and no ``loss``: :func:`train_rows` / :func:`eval_rows` tell them apart."""
from __future__ import annotations

import json
import os
import sys

import torch
from tqdm import tqdm

from fedsea_hpc.config import RunConfig, TrainConfig
from fedsea_hpc.components.outputs import write_json
from fedsea_hpc.components.phases import PHASES  # noqa: F401  (re-exported: the loops import it from here)
from fedsea_hpc.transport.wire import Kind

# Byte counters reported per step: payload per message kind, then the fixed-size headers.
BYTE_KEYS = tuple(k.name for k in Kind) + ("header",)


def is_eval_row(row: dict) -> bool:
    return "eval_loss" in row


def train_rows(rows: list[dict]) -> list[dict]:
    """The optimizer steps' rows of a metrics.jsonl (eval rows left out)."""
    return [r for r in rows if not is_eval_row(r)]


def eval_rows(rows: list[dict]) -> list[dict]:
    """The eval passes' rows of a metrics.jsonl."""
    return [r for r in rows if is_eval_row(r)]


class MetricsLog:
    def __init__(self, run: RunConfig, train: TrainConfig, *, enabled: bool, rows: list[dict] | None = None):
        """``rows``: the rows of a resumed run's earlier steps and evals; metrics.jsonl starts with
        them (a crashed run's rows after its checkpoint are dropped, so no step appears twice)."""
        self.run, self.train, self.enabled = run, train, enabled
        self.all_rows: list[dict] = list(rows or [])  # in file order: steps and evals
        self.rows = train_rows(self.all_rows)
        self.evals = eval_rows(self.all_rows)
        if not enabled:
            return
        os.makedirs(run.output_dir, exist_ok=True)
        self.file = open(os.path.join(run.output_dir, "metrics.jsonl"), "w")
        self.file.writelines(json.dumps(r) + "\n" for r in self.all_rows)
        self.file.flush()
        self.bar = None  # created by start(), after set-up: its rate and ETA are the steps' own

    def start(self) -> None:
        """The progress bar, when the first step is about to run (not before the model load and
        DeepSpeed's one-time op build, which would make step 1 look like minutes)."""
        if self.enabled and self.bar is None:
            self.bar = tqdm(total=self.train.steps, initial=len(self.rows), desc=f"train[{self.train.mode}]",
                            unit="step", disable=not self.run.progress, file=sys.stderr, dynamic_ncols=True)

    def step(self, step: int, sums: torch.Tensor, maxima: torch.Tensor, costs: dict | None = None,
             extra: dict | None = None) -> None:
        """Record one step from the world-reduced vectors (sums: loss, tokens, samples, bytes…);
        ``costs``: the cost model's smoothed per-client costs (:mod:`fedsea_hpc.adapt.costs`);
        ``extra``: events of this step (a repartition and its measurement, :mod:`fedsea_hpc.adapt.rebalance`)."""
        if not self.enabled:
            return
        loss_sum, tokens, samples = (float(v) for v in sums[:3])
        by_kind = {k: int(v) for k, v in zip(BYTE_KEYS, sums[3:].tolist())}
        row = {
            "step": step + 1,
            "loss": loss_sum / max(tokens, 1.0),
            "tokens": int(tokens),
            "samples": int(samples),
            "step_time_s": float(maxima[0]),
            "bytes_sent": sum(by_kind.values()),
            "bytes_sent_by_kind": by_kind,
            "phase_s": {p: round(float(v), 6) for p, v in zip(PHASES, maxima[1:].tolist())},
        }
        if costs is not None:
            row["costs"] = {k: [round(float(x), 7) for x in v] for k, v in costs.items()}
        row.update(extra or {})
        self.rows.append(row)
        self._write(row)
        self.start()
        self.bar.update(1)
        self._postfix()
        if not self.run.progress and (step + 1) % self.run.log_every == 0:
            print(f"step {step + 1}/{self.train.steps} loss {row['loss']:.4f} "
                  f"step_time {row['step_time_s']:.3f}s bytes {row['bytes_sent']}", flush=True)

    def eval(self, row: dict | None) -> None:
        """Record an eval pass (:func:`fedsea_hpc.train.evaluation.eval_row`); None on ranks
        other than 0."""
        if not self.enabled or row is None:
            return
        self.evals.append(row)
        self._write(row)
        self._postfix()
        if not self.run.progress:
            per = ", ".join(f"{x:.4f}" for x in row["eval_client_loss"])
            models = row.get("eval_model_loss")  # train.mode=local: each client's own model
            shared = "" if models is None else "; each model on the shared set " + ", ".join(f"{x:.4f}" for x in models)
            print(f"eval after step {row['step']}: loss {row['eval_loss']:.4f} (ppl {row['eval_ppl']:.2f}; "
                  f"per client {per}{shared}) in {row['eval_s']:.2f}s", flush=True)

    def _write(self, row: dict) -> None:
        self.all_rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def _postfix(self) -> None:
        if self.bar is None or not self.rows:
            return
        last = self.rows[-1]
        shown = {"loss": f"{last['loss']:.4f}", "s_per_step": f"{last['step_time_s']:.3f}"}
        if self.evals:
            shown["eval_loss"] = f"{self.evals[-1]['eval_loss']:.4f}"
        self.bar.set_postfix(shown)

    def close(self) -> None:
        """Stop without a summary (a run stopped by a signal: its checkpoint has the rows)."""
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.file.close()

    def finish(self, wall_s: float, extra: dict | None = None) -> dict | None:
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        rows = self.rows
        # The first steps include one-off warm-up (allocator, thread pools): report both.
        steady = rows[min(2, len(rows) - 1):]
        summary = {
            "mode": self.train.mode,
            "steps": len(rows),
            "first_loss": rows[0]["loss"],
            "final_loss": rows[-1]["loss"],
            "losses": [r["loss"] for r in rows],
            "tokens_total": sum(r["tokens"] for r in rows),
            "samples_total": sum(r["samples"] for r in rows),
            "wall_time_s": wall_s,
            "mean_step_time_s": sum(r["step_time_s"] for r in steady) / len(steady),
            "bytes_sent_total": sum(r["bytes_sent"] for r in rows),
            "bytes_sent_by_kind": {k: sum(r["bytes_sent_by_kind"][k] for r in rows)
                                   for k in rows[0]["bytes_sent_by_kind"]},
            **self._eval_summary(),
            **(extra or {}),
        }
        write_json(os.path.join(self.run.output_dir, "summary.json"), summary)
        evaluated = f", eval loss {summary['eval_loss']:.4f}" if self.evals else ""
        print(f"done: {summary['steps']} steps in {wall_s:.1f}s, loss {summary['first_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}{evaluated}, {summary['mean_step_time_s'] * 1000:.1f} ms/step, "
              f"{summary['bytes_sent_total'] / 2**20:.2f} MiB sent; outputs in {self.run.output_dir}",
              flush=True)
        return summary

    def _eval_summary(self) -> dict:
        """summary.json's eval keys: the last pass, and every pass's step and loss."""
        if not self.evals:
            return {}
        last = self.evals[-1]
        keep = ("eval_loss", "eval_ppl", "eval_tokens", "eval_client_loss", "eval_client_ppl", "eval_noise",
                "eval_model_loss", "eval_matrix")
        return {"eval_step": last["step"], **{k: last[k] for k in keep if k in last},
                "evals": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in self.evals]}
