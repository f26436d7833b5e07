"""Held-out evaluation during training: a forward-only pass of the model over every client's eval set.

The split modes run it through the same parts and the same wire as training (A on the client →
B on its server rank → C and the loss on the client), with no optimizer step and, unless
``privacy.noise_in_eval``, no noise on what a client sends. Eval data stays on its client like
training data: only hidden states of its real tokens cross. ``train.mode=centralized`` computes
the same on the union with the unsplit model, so with noise off the two agree to rounding;
``train.mode=local`` scores each client's own model on every client's set (:func:`evaluate_local`).

A pass is rounds: in round r every client with more than r eval batches sends its r-th; a server
rank forwards what its clients sent as one client-batch, or a dummy row when none of its clients
has a batch left (every server rank makes the same engine calls, as ZeRO-3 needs).
One world sum gives every rank each client's batch count first, and one gives rank 0 each
client's loss sum, loss tokens and samples at the end. Reported per client and token-weighted
overall, with perplexity ``exp(loss)``.
"""
from __future__ import annotations

import math
import time

import torch

from fedsea_hpc.config import Config
from fedsea_hpc.distributed import reduce
from fedsea_hpc.distributed.topology import Role, Topology
from fedsea_hpc.model.masks import lengths_to_mask
from fedsea_hpc.model.partition import loss_sum
from fedsea_hpc.trace import OTHER, TRACE

# Header step of eval round r: EVAL_STEP + r. Training steps never reach it, so an eval message
# can never pass for a training one (the receiver checks the step of every header).
EVAL_STEP = 1 << 40


def has_eval_set(cfg: Config) -> bool:
    """Whether the clients have held-out data (data.eval_files or data.eval_fraction)."""
    return bool(cfg.data.eval_files) or cfg.data.eval_fraction > 0


def due(cfg: Config, done: int) -> bool:
    """Evaluate after ``done`` steps? Every ``train.eval_every`` steps and after the last one."""
    if not has_eval_set(cfg):
        return False
    every = cfg.train.eval_every
    return done == cfg.train.steps or (every > 0 and done % every == 0)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def eval_row(done: int, per_client: list[tuple[float, float, float]], seconds: float, bytes_sent: int,
             noise: bool) -> dict:
    """The metrics row of one eval pass: ``per_client`` = (loss sum, loss tokens, samples) each."""
    loss_c = [ls / max(t, 1.0) for ls, t, _ in per_client]
    total, tokens = sum(ls for ls, _, _ in per_client), sum(t for _, t, _ in per_client)
    loss = total / max(tokens, 1.0)
    return {"step": done, "eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": int(tokens),
            "eval_samples": int(sum(s for _, _, s in per_client)),
            "eval_client_loss": loss_c, "eval_client_ppl": [perplexity(x) for x in loss_c],
            "eval_client_tokens": [int(t) for _, t, _ in per_client],
            "eval_s": round(seconds, 6), "eval_bytes_sent": int(bytes_sent), "eval_noise": noise}


def evaluate_split(cfg: Config, topo: Topology, worker, counter, wire: torch.device, done: int) -> dict | None:
    """One eval pass of the split model; every rank of the job calls it together. Rank 0
    returns the row (:func:`eval_row`), the others None."""
    t0, stamp = time.perf_counter(), TRACE.stamp()
    sent_before = sum(counter.totals()["sent"].values())
    counts = torch.zeros(topo.clients, dtype=torch.float64, device=wire)
    if topo.role is Role.CLIENT:
        counts[worker.index] = len(worker.eval_batches)
    reduce.sum_(counts)
    counts = [int(n) for n in counts.tolist()]
    noise = bool(cfg.privacy.noise_in_eval)
    mine = (0.0, 0, 0)
    if topo.role is Role.CLIENT:
        mine = worker.eval_pass(noise, EVAL_STEP)
    else:
        worker.eval_rounds(counts, EVAL_STEP)
    sums = torch.zeros(3 * topo.clients + 1, dtype=torch.float64, device=wire)
    if topo.role is Role.CLIENT:
        sums[3 * worker.index:3 * worker.index + 3] = torch.tensor(mine, dtype=torch.float64)
    sums[-1] = sum(counter.totals()["sent"].values()) - sent_before
    reduce.sum_(sums)
    TRACE.close(stamp, "eval (forward only)", OTHER, step=done)
    if topo.rank != 0:
        return None
    v = sums.tolist()
    return eval_row(done, [tuple(v[3 * c:3 * c + 3]) for c in range(topo.clients)], time.perf_counter() - t0,
                    int(v[-1]), noise)


@torch.no_grad()
def eval_sets_pass(model, eval_sets, micro_batch_size: int, device: torch.device) -> list[tuple[float, int, int]]:
    """An unsplit model over each eval set: (loss sum, loss tokens, samples) per set."""
    was = model.training
    model.eval()
    per_set = []
    for data in eval_sets:
        total, tokens, samples = 0.0, 0, 0
        for batch in data.eval_batches(micro_batch_size):
            batch = batch.to(device)
            mask = lengths_to_mask(batch.lengths, batch.input_ids.shape[1], "right")
            total += float(loss_sum(model(input_ids=batch.input_ids, attention_mask=mask).logits, batch.labels))
            tokens, samples = tokens + batch.num_loss_tokens, samples + batch.input_ids.shape[0]
        per_set.append((total, tokens, samples))
    model.train(was)
    return per_set


def evaluate_centralized(model, eval_sets, micro_batch_size: int, device: torch.device, done: int) -> dict:
    """``train.mode=centralized``: the same pass with the unsplit model, client by client."""
    t0 = time.perf_counter()
    per_client = eval_sets_pass(model, eval_sets, micro_batch_size, device)
    return eval_row(done, per_client, time.perf_counter() - t0, 0, False)


def evaluate_local(models, eval_sets, micro_batch_size: int, device: torch.device, done: int) -> dict:
    """``train.mode=local``: every client's own model on every client's eval set.

    ``eval_loss`` is the mean over the clients' models of each one's loss on the shared eval set
    (the union of the eval sets, token-weighted): how well the average silo alone does on what
    federation is judged on. ``eval_model_loss[m]`` is model m's loss on that shared set,
    ``eval_client_loss[c]`` client c's model on its own eval set, ``eval_matrix[m][c]`` model m
    on client c's set."""
    t0 = time.perf_counter()
    table = [eval_sets_pass(m, eval_sets, micro_batch_size, device) for m in models]
    shared = [sum(ls for ls, _, _ in row) / max(sum(t for _, t, _ in row), 1) for row in table]
    own = [table[c][c] for c in range(len(models))]
    out = eval_row(done, own, time.perf_counter() - t0, 0, False)
    loss = sum(shared) / len(shared)
    out.update(eval_loss=loss, eval_ppl=perplexity(loss), eval_tokens=int(sum(t for _, t, _ in table[0])),
               eval_samples=int(sum(s for _, _, s in table[0])), eval_model_loss=shared,
               eval_matrix=[[ls / max(t, 1) for ls, t, _ in row] for row in table])
    return out
