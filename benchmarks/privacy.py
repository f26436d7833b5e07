"""Measured inversion attack on the noised hidden states a client sends (privacy vs utility).

A curious server knows the public base model, the partition point p and the noise setting. On
*auxiliary public text* (default: the shipped client0 + client1 files) it computes h_A itself,
noises it exactly as a client does (``fedsea_hpc.privacy.noise.add_noise``, fresh noise every
step) and trains inverters back to the input ids; it then attacks a *different* client's text
(default: client2), which it never trained on, from one noisy copy of that client's h_A.

Inverters (``fedsea_hpc.privacy.attack``):

- ``position``: per-position ridge regression h -> input embedding (+ residual MLP), decoded
  against the public embedding matrix, fine-tuned with cross-entropy (``--steps``).
- ``decoder``: FedSEA's attack, the model's last p blocks + norm + LM head (head frozen),
  fine-tuned on noised h_A -> input ids at the same position (``--steps``).

Metrics: positional token accuracy over the victim's real tokens and ROUGE-L F1 of the decoded
reconstruction (``rouge-score``). Utility, on the same grid: the held-out LM loss (next-token,
the data pipeline's labels) of the *frozen pretrained* model on the victim's text when blocks
p..L-1 receive the same noised h_A: "no fine-tune", not a trained result.

Grid: for each p in ``--p``, absolute sigmas ``--sigmas`` (noise std) and relative ones
``--relative`` (noise std = value x each token's RMS); every row also reports sigma / RMS(h_A),
with RMS over the victim's real tokens.

    python benchmarks/privacy.py --out benchmarks/results/privacy.json

writes the JSON (rows, machine, command), ``privacy.md`` (the table) and ``privacy.png`` (the plot)
beside ``--out``, and prints the table. The JSON also holds, per inverter, its training loss
(first/last step), timings and three reference/reconstruction text pairs, and two baselines:
the share of the victim's tokens that occur in the aux text at all, and the accuracy of always
guessing the aux text's most frequent token.

Cost (SmolLM2-135M, float32, ``--threads 1`` on the 2-core VM): each grid row takes about
20 s + 4 s x ``--steps`` (both inverters, 16 aux records per step; the V x H head dominates),
so the default grid (3 p x 9 settings = 27 rows, 30 steps) took 78 minutes. ``--device cuda``
(the default when a GPU is visible) runs the same code on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from _common import REPO, SMOLLM2_DIR, ensure_smollm2, machine_info

from fedsea_hpc.data.dataset import IGNORE_INDEX, collate, encode_record, read_jsonl
from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, load_tokenizer
from fedsea_hpc.model.loading import resolve_model
from fedsea_hpc.model.partition import build_part, loss_sum
from fedsea_hpc.privacy.attack import (DecoderInverter, PositionInverter, evaluate, hidden_states,
                                       length_mask, train_inverter)
from fedsea_hpc.privacy.noise import add_noise

TINY_DATA = "fedsea_hpc/data/tiny"
INVERTERS = ("position", "decoder")


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SMOLLM2_DIR, help="checkpoint dir (SmolLM2 is fetched if missing) or 'tiny'")
    ap.add_argument("--sigmas", default="0,0.0125,0.025,0.05,0.1,0.2", help="absolute noise stds")
    ap.add_argument("--relative", default="0.25,1,4", help="relative noise (x per-token RMS); '' for none")
    ap.add_argument("--p", default="1,2,4", help="partition points (blocks in Part A)")
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps of each inverter")
    ap.add_argument("--inverters", default=",".join(INVERTERS), help=f"subset of {','.join(INVERTERS)}")
    ap.add_argument("--aux-files", default=f"{TINY_DATA}/client0.jsonl,{TINY_DATA}/client1.jsonl",
                    help="the attacker's public auxiliary text (JSONL)")
    ap.add_argument("--victim-file", default=f"{TINY_DATA}/client2.jsonl", help="the victim client's text")
    ap.add_argument("--victim-records", type=int, default=0, help="attack this many victim records (0 = all)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="records per inverter training step")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--mlp-width", type=int, default=576, help="position inverter MLP width (0 = linear)")
    ap.add_argument("--lr-position", type=float, default=1e-4)
    ap.add_argument("--lr-decoder", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--out", default="benchmarks/results/privacy.json")
    return ap.parse_args(argv)


def encode(files: list[str], tokenizer, seq_len: int):
    """All records of ``files`` -> list of (ids, labels) lists (the training pipeline's encoding)."""
    return [encode_record(r, tokenizer, seq_len) for f in files for r in read_jsonl(REPO / f)]


def batches_of(examples, size: int, pad_id: int):
    return [collate(examples[i:i + size], pad_id) for i in range(0, len(examples), size)]


def main(argv=None) -> int:
    args = parse_args(argv)
    # An untrained inverter's softmax over a 49k vocabulary is full of denormal probabilities, and
    # fp32 matmuls on denormals are ~30x slower on CPU (measured: 24 s vs 0.7 s for one backward).
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    inverters = [x for x in args.inverters.split(",") if x]
    unknown = set(inverters) - set(INVERTERS)
    if unknown:
        sys.exit(f"privacy.py: unknown inverters {sorted(unknown)}; choose from {INVERTERS}")
    settings = [("absolute", s) for s in floats(args.sigmas)] + [("relative", s) for s in floats(args.relative)]
    ps = ints(args.p)
    t_start = time.perf_counter()

    if args.model == SMOLLM2_DIR:
        ensure_smollm2()
    source = resolve_model(args.model if args.model == "tiny" else str(REPO / args.model),
                           tiny_vocab_size=TINY_VOCAB_SIZE, seed=0)
    source.config._attn_implementation = "sdpa"
    tok = load_tokenizer(source.tokenizer_path)
    L, H = source.config.num_hidden_layers, source.config.hidden_size
    if not all(1 <= p < L for p in ps):
        sys.exit(f"privacy.py: --p values must be in 1..{L - 1}")
    full = build_part(source, list(range(L)), embed=True, head=True, dtype=torch.float32).to(device).eval()
    for q in full.parameters():
        q.requires_grad_(False)
    embedding = full.model.embed_tokens.weight.detach()
    pad = tok.pad_token_id

    aux_files, victim_files = args.aux_files.split(","), [args.victim_file]
    if set(aux_files) & set(victim_files):
        sys.exit("privacy.py: the victim's file must not be part of the attacker's auxiliary text")
    aux = encode(aux_files, tok, args.seq_len)
    victim = encode(victim_files, tok, args.seq_len)
    if args.victim_records:
        keep = np.random.default_rng(args.seed).permutation(len(victim))[: args.victim_records]
        victim = [victim[i] for i in sorted(keep)]
    print(f"aux: {len(aux)} records, {sum(len(e.input_ids) for e in aux)} tokens from {aux_files}; "
          f"victim: {len(victim)} records, {sum(len(e.input_ids) for e in victim)} tokens from {victim_files}",
          flush=True)

    # Clean h_A of every record for every p, computed once (the attacker can do this on its own text).
    t0 = time.perf_counter()
    aux_b = [b.to(device) for b in batches_of(aux, args.eval_batch_size, pad)]
    vic_b = [b.to(device) for b in batches_of(victim, args.eval_batch_size, pad)]
    aux_h = [hidden_states(full, b.input_ids, b.lengths, ps) for b in aux_b]
    vic_h = [hidden_states(full, b.input_ids, b.lengths, ps) for b in vic_b]
    # Per-record [T_i, H] pieces of the aux h_A, so training batches can be drawn in any order.
    aux_rec = {p: [h[p][i, :n] for b, h in zip(aux_b, aux_h) for i, n in enumerate(b.lengths.tolist())] for p in ps}
    aux_ids = [b.input_ids[i, :n] for b in aux_b for i, n in enumerate(b.lengths.tolist())]
    print(f"h_A computed in {time.perf_counter() - t0:.1f}s", flush=True)

    # Context for the numbers: how much of the victim's text the aux text could teach at all.
    aux_counts = Counter(torch.cat(aux_ids).tolist())
    vic_ids = torch.cat([b.input_ids[length_mask(b.lengths, b.input_ids.shape[1])] for b in vic_b]).tolist()
    top_aux = aux_counts.most_common(1)[0][0]
    baselines = {"aux_majority_token_accuracy": sum(t == top_aux for t in vic_ids) / len(vic_ids),
                 "victim_tokens_seen_in_aux": sum(t in aux_counts for t in vic_ids) / len(vic_ids),
                 "aux_distinct_tokens": len(aux_counts)}
    print(f"baselines: {baselines}", flush=True)

    def rms(p):  # over the victim's real tokens
        sq = sum(float(h[p][length_mask(b.lengths, h[p].shape[1])].square().sum()) for b, h in zip(vic_b, vic_h))
        n = sum(int(b.lengths.sum()) for b in vic_b)
        return (sq / (n * H)) ** 0.5

    def train_batches(p, seed):
        """Endless random batches (h [B, T, H], ids [B, T], lengths [B]) of aux records."""
        rng = np.random.default_rng(seed)
        while True:
            idx = rng.choice(len(aux_ids), size=min(args.batch_size, len(aux_ids)), replace=False)
            lengths = torch.tensor([len(aux_ids[i]) for i in idx], device=device)
            T = int(lengths.max())
            h = torch.zeros(len(idx), T, H, device=device)
            ids = torch.full((len(idx), T), pad, dtype=torch.long, device=device)
            for j, i in enumerate(idx):
                h[j, : len(aux_ids[i])] = aux_rec[p][i]
                ids[j, : len(aux_ids[i])] = aux_ids[i]
            yield h, ids, lengths

    rows: list[dict] = []

    def result(complete: bool) -> dict:
        return {
            "what": ("inversion attack by a curious server on h_A + noise: inverters trained on auxiliary "
                     "public text, evaluated on another client's text; utility = held-out LM loss of the "
                     "pretrained model with that noise, no fine-tune"),
            "complete": complete,
            "model": args.model, "num_layers": L, "hidden_size": H, "vocab_size": source.config.vocab_size,
            "aux_files": aux_files, "victim_files": victim_files,
            "aux_records": len(aux), "aux_tokens": sum(len(e.input_ids) for e in aux),
            "victim_records": len(victim), "victim_tokens": sum(len(e.input_ids) for e in victim),
            "victim_loss_tokens": sum(b.num_loss_tokens for b in vic_b), "baselines": baselines,
            "args": vars(args), "device": str(device), "torch_threads": torch.get_num_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "command": [sys.executable, *sys.argv], "machine": machine_info(),
            "wall_s": round(time.perf_counter() - t_start, 1), "rows": rows,
        }

    def write_json(res: dict) -> None:
        """Replace ``--out`` whole (temp file, then rename): a reader never sees half a file."""
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(out)

    for p in ps:
        rms_p = rms(p)
        for mode, sigma in settings:
            rel = mode == "relative"
            t_row = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + 1)

            def noise(h):
                return add_noise(h, sigma, gen, relative=rel)

            # The victim's h_A as the server receives it: one noisy copy, which also feeds Part B.
            vgen = torch.Generator(device=device).manual_seed(args.seed * 1000 + 2)
            victim_noised = [add_noise(h[p], sigma, vgen, relative=rel) for h in vic_h]
            batches = [(hn, b.input_ids, b.lengths) for hn, b in zip(victim_noised, vic_b)]
            row = {"p": p, "mode": mode, "sigma": sigma, "rms_h_a": rms_p,
                   "sigma_over_rms": sigma if rel else sigma / rms_p, "attack": {}}

            with torch.no_grad():  # utility: frozen pretrained model, noise after block p-1
                tot = ntok = 0.0
                for hn, b in zip(victim_noised, vic_b):
                    out = full.run_layers(hn, list(range(p, L)), full.context(hn, b.lengths))
                    tot += float(loss_sum(full.head_logits(out), b.labels))
                    ntok += b.num_loss_tokens
                row["utility_lm_loss"] = tot / ntok

            for name in inverters:
                t_inv = time.perf_counter()
                if name == "position":
                    inv = PositionInverter(embedding, width=args.mlp_width,
                                           generator=torch.Generator().manual_seed(args.seed)).to(device)
                    flat_h = torch.cat(aux_rec[p])
                    inv.fit_ridge(noise(flat_h), torch.cat(aux_ids))
                    lr = args.lr_position
                else:
                    part = build_part(source, list(range(L - p, L)), embed=False, head=True,
                                      dtype=torch.float32).to(device)
                    inv = DecoderInverter(part)
                    lr = args.lr_decoder
                t_fit = time.perf_counter()
                losses = train_inverter(inv, train_batches(p, args.seed), steps=args.steps, lr=lr, noise=noise)
                t_train = time.perf_counter()
                res = evaluate(inv, batches, tok)
                res.update(train_loss_first=losses[0] if losses else None,
                           train_loss_last=losses[-1] if losses else None, steps=len(losses), lr=lr,
                           fit_s=round(t_fit - t_inv, 2), train_s=round(t_train - t_fit, 2),
                           eval_s=round(time.perf_counter() - t_train, 2))
                row["attack"][name] = res
                del inv
            row["wall_s"] = round(time.perf_counter() - t_row, 1)
            rows.append(row)
            accs = " ".join(f"{n}={row['attack'][n]['token_accuracy']:.3f}/{row['attack'][n]['rouge_l_f1']:.3f}"
                            for n in inverters)
            print(f"p={p} {mode} sigma={sigma:g} (sigma/rms={row['sigma_over_rms']:.4f}): acc/rougeL {accs}; "
                  f"utility loss {row['utility_lm_loss']:.3f}  [{row['wall_s']}s]", flush=True)
            write_json(result(complete=False))  # a run cut short keeps the rows it measured

    out = Path(args.out)
    res = result(complete=True)
    write_json(res)
    table = markdown(res, inverters)
    out.with_suffix(".md").write_text(table + "\n")
    plot(res, inverters, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} in {res['wall_s']}s")
    return 0


def markdown(result: dict, inverters: list[str]) -> str:
    head = ["p", "mode", "σ", "σ / RMS(h_A)"]
    for n in inverters:
        head += [f"{n} acc", f"{n} ROUGE-L"]
    head += ["utility: LM loss (frozen, no fine-tune)"]
    b = result["baselines"]
    caption = (f"{Path(result['model']).name}; attacker trains on {', '.join(Path(f).name for f in result['aux_files'])} "
               f"({result['aux_tokens']} tokens), attacks {', '.join(Path(f).name for f in result['victim_files'])} "
               f"({result['victim_tokens']} tokens); {result['args']['steps']} fine-tuning steps per inverter. "
               f"Always guessing the aux text's most frequent token scores {b['aux_majority_token_accuracy']:.3f}; {b['victim_tokens_seen_in_aux']:.1%} of "
               "the victim's tokens occur in the aux text. Utility = held-out LM loss of the pretrained model "
               "with that noise, no fine-tune.")
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in result["rows"]:
        cells = [str(r["p"]), r["mode"], f"{r['sigma']:g}", f"{r['sigma_over_rms']:.4f}"]
        for n in inverters:
            a = r["attack"][n]
            cells += [f"{a['token_accuracy']:.3f}", f"{a['rouge_l_f1']:.3f}"]
        cells.append(f"{r['utility_lm_loss']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, inverters: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = {"position": "o", "decoder": "s"}
    for p in sorted({r["p"] for r in result["rows"]}):
        rows = sorted((r for r in result["rows"] if r["p"] == p), key=lambda r: r["sigma_over_rms"])
        for n in inverters:
            x = [max(r["sigma_over_rms"], 1e-4) for r in rows]  # sigma 0 drawn at 1e-4 on the log axis
            acc = [r["attack"][n]["token_accuracy"] for r in rows]
            ax1.plot(x, acc, marker=markers.get(n, "x"), label=f"p={p} {n}")
            ax2.plot([r["utility_lm_loss"] for r in rows], acc, marker=markers.get(n, "x"), linestyle="",
                     label=f"p={p} {n}")
    ax1.set_xscale("log")
    ax1.set_xlabel("σ / RMS(h_A)   (σ = 0 drawn at 1e-4)")
    ax1.set_ylabel("attack token accuracy (victim text)")
    ax1.set_title("privacy: inversion accuracy vs noise")
    ax2.set_xlabel("utility: held-out LM loss, frozen pretrained model with noise (lower = better)")
    ax2.set_ylabel("attack token accuracy (lower = more private)")
    ax2.set_title("privacy vs utility")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(result['model']).name}: aux = {', '.join(Path(f).name for f in result['aux_files'])}; "
                 f"victim = {', '.join(Path(f).name for f in result['victim_files'])}; "
                 f"{result['args']['steps']} steps per inverter", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
