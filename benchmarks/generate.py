"""Split generation with and without the KV cache vs centralized ``transformers`` generate.

For each prompt length T (default 128 and 512 tokens) and a batch of B prompts (default 4) this runs:

* ``kv``: ``mpiexec -n clients+servers python -m fedsea_hpc generate`` with ``generate.kv_cache=true``;
* ``nocache``: the same with ``generate.kv_cache=false`` (the baseline that re-sends and recomputes the
  whole sequence every step), by default for all 64 tokens (about 3 of the ~5 minutes at T=512).
  ``--baseline-new-tokens N`` shortens it: its later, longer steps are then skipped, so the measured
  baseline latency is a lower bound (and its tokens/s an upper bound) of a full run's, and the
  reported speed-ups are lower bounds;
* ``centralized``: ``transformers`` ``generate`` on the unsplit model (``ModelSource.build_model()``),
  one process, ``OMP_NUM_THREADS`` = all cores, the same left-padded batch, greedy, same dtype.

Prompts are built to exactly T tokens with the model's tokenizer (``encode_prompt``, as the CLI
encodes a ``{"prompt"}`` record; ``generate.chat_template=false``). Every mode uses the same
definitions: tokens/s = new tokens / wall time from the start of the prompt step to the end of the
last step (the CLI's ``wall_s``, clocks started together after a barrier); per-token latency = the
decode phase (after the prompt step's logits, up to the end) / decode steps (B rows get one token
per step). Centralized times come from a logits processor that stamps every step.

Minimum bytes: only hidden states must cross: ``2·T·H·itemsize`` per sequence for the prompt step
(h_A up, h_B down) and ``2·H·itemsize`` per sequence per decode step. The CLI counts every byte the
client ranks send and receive (payload + headers + lengths + control); the decode part is rebuilt
from the summary's per-sequence decode bytes and the decode steps seen in the outputs.

    python benchmarks/generate.py --out benchmarks/results/generate.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, SMOLLM2_DIR, ensure_smollm2, least_disturbed_run, machine_info, mpiexec,  # noqa: E402
                     split_threads)

WORKERS = Path(__file__).resolve().with_name("generate_workers.py")  # the single-process measurements

# Plain English prose; rotated per prompt so the B prompts differ. Raw continuation (no chat
# template) of prose keeps greedy SmolLM2 from emitting EOS within 64 tokens.
TEXT = (
    "The harbour town woke slowly in the grey light of early spring. Fishermen carried their nets down "
    "to the boats, arguing about the weather and the price of diesel, while the baker on the corner "
    "pulled the first loaves from an oven older than anyone could remember. Up on the hill the old "
    "lighthouse keeper, who had retired twenty years ago but still climbed the stairs every morning, "
    "wrote in his logbook that the wind had turned to the north-east overnight. Children ran along the "
    "sea wall on their way to school, counting the gulls and daring each other to jump the puddles. "
    "In the library the new librarian was unpacking boxes of books donated by a family who had moved "
    "away, finding letters, pressed flowers and a map of the coast drawn by hand a century before. "
    "The map showed a path along the cliffs that nobody in town had walked for decades, ending at a "
    "small cove marked only with a cross and the words 'the second tide'. She showed it to the "
    "lighthouse keeper that afternoon, and he looked at it for a long time before saying anything. "
    "Market day brought farmers from the valley with crates of early vegetables, cheese wrapped in "
    "cloth and jars of honey that glowed in the sun. The town council met in the evening to discuss the "
    "repair of the old pier, the summer festival and a complaint about the noise of the ferry engines. "
)


def build_prompts(tok, length: int, count: int) -> list[str]:
    """``count`` different texts that ``encode_prompt`` turns into exactly ``length`` tokens."""
    from fedsea_hpc.data.dataset import encode_prompt

    words = TEXT.split()
    out = []
    for i in range(count):
        start = (i * len(words)) // count
        rot = " ".join(words[start:] + words[:start])
        text = rot
        while len(encode_prompt(text, tok)) < length + 8:
            text += " " + rot
        ids = encode_prompt(text, tok)
        for cut in range(length, length - 16, -1):  # a decode/encode round trip may merge tokens
            cand = tok.decode(ids[:cut], skip_special_tokens=False)
            got = len(encode_prompt(cand, tok))
            if got == length:
                out.append(cand)
                break
            if got < length:  # the cut merged tokens: one more source token makes up for it
                cand = tok.decode(ids[:cut + 1], skip_special_tokens=False)
                if len(encode_prompt(cand, tok)) == length:
                    out.append(cand)
                    break
        else:
            raise RuntimeError(f"cannot build a prompt of exactly {length} tokens")
    return out


# ------------------------------------------------------------------ centralized (a child process)

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _decode_steps(records: list[dict], batch_size: int) -> tuple[int, int]:
    """(decode steps, decode row-tokens) of one client: each batch runs max(new tokens) - 1 steps."""
    steps = rows = 0
    for i in range(0, len(records), batch_size):
        b = records[i:i + batch_size]
        k = max(len(r["token_ids"]) for r in b) - 1
        steps, rows = steps + k, rows + k * len(b)
    return steps, rows


def run_mode(label: str, length: int, args, run_root: Path, prompts_file: Path, hidden: int, itemsize: int) -> dict:
    odir = run_root / f"T{length}" / label
    ncpu = os.cpu_count() or 1
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    world = args.clients + args.servers
    if label == "centralized":
        new = args.max_new_tokens
        env["OMP_NUM_THREADS"] = str(ncpu)
        cmd = [sys.executable, str(WORKERS), "centralized", "--model-dir", args.model_dir,
               "--prompts-file", str(prompts_file), "--batch-size", str(args.batch_size), "--max-new-tokens", str(new),
               "--dtype", args.dtype, "--worker-out", str(odir / "centralized.json")]
        threads, ranks = ncpu, 1
    elif label == "breakdown":
        new = args.max_new_tokens
        thr = args.split_omp_threads or split_threads(args.clients, args.servers)["server"]
        env["OMP_NUM_THREADS"] = str(thr)
        cmd = [sys.executable, str(WORKERS), "breakdown", "--model-dir", args.model_dir,
               "--config", args.config, "--prompts-file", str(prompts_file), "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(new), "--dtype", args.dtype, "--worker-out", str(odir / "breakdown.json")]
        threads, ranks = thr, 1
    else:
        new = args.max_new_tokens if label == "kv" else args.baseline_new_tokens
        ov = [f"model.name_or_path={args.model_dir}", f"model.dtype={args.dtype}",
              f"topology.clients={args.clients}", f"topology.servers={args.servers}",
              f"generate.prompts_files={prompts_file}", "generate.chat_template=false",
              f"generate.max_new_tokens={new}", f"generate.batch_size={args.batch_size}", "generate.temperature=0",
              f"generate.kv_cache={'true' if label == 'kv' else 'false'}", f"run.output_dir={odir}"]
        cmd = [mpiexec(), "-n", str(world), sys.executable, "-m", "fedsea_hpc", "generate", "--config", args.config, *ov]
        threads, ranks = split_threads(args.clients, args.servers), world
        if args.split_omp_threads:
            env["OMP_NUM_THREADS"], threads = str(args.split_omp_threads), args.split_omp_threads

    def finish(run: dict, odir: Path) -> None:
        if label == "breakdown":
            run.update(json.loads((odir / "breakdown.json").read_text()))
            print(f"[T={length}/{label}] decode step compute: " + ", ".join(
                f"{k} {v * 1e3:.1f} ms" for k, v in run["decode_step_s"].items()) + f" ({run['process_wall_s']:.0f}s; other "
                f"processes used {run['foreign_cpu_frac']:.0%} of the cores meanwhile)", flush=True)
        else:
            if label == "centralized":
                w = json.loads((odir / "centralized.json").read_text())
                records = w.pop("records")
                run.update(w)
                run["torch_threads_per_rank"] = w["torch_threads"]
                run["bytes"] = None
            else:
                s = json.loads((odir / "generate_summary.json").read_text())
                per_client = [_read_jsonl(odir / f"generations-client{c}.jsonl") for c in range(args.clients)]
                records = [r for c in per_client for r in c]  # client-major; run_length() restores prompt order
                steps_rows = [_decode_steps(c, args.batch_size) for c in per_client]
                decode_steps, decode_rows = sum(x[0] for x in steps_rows), sum(x[1] for x in steps_rows)
                bytes_decode = round(s["decode_bytes_per_token_per_sequence"] * decode_rows)
                bytes_prompt = s["bytes_total"] - bytes_decode
                prompt_tokens = s["prompt_tokens"]  # unpadded; all prompts have the same length here
                min_prompt = 2 * prompt_tokens * hidden * itemsize
                min_decode = 2 * decode_rows * hidden * itemsize
                run.update({k: s[k] for k in ("wall_s", "new_tokens", "tokens_per_s", "prompt_phase_s", "decode_phase_s",
                                              "per_token_latency_s")})
                run["decode_steps"] = decode_steps
                run["summary"] = s
                run["bytes"] = {
                    "total": s["bytes_total"], "prompt": bytes_prompt, "decode": bytes_decode,
                    "decode_row_tokens": decode_rows,
                    "min_prompt": min_prompt, "min_decode": min_decode, "min_total": min_prompt + min_decode,
                    "decode_ratio": bytes_decode / min_decode if min_decode else None,
                    "prompt_ratio": bytes_prompt / min_prompt,
                    "total_ratio": s["bytes_total"] / (min_prompt + min_decode),
                    "per_new_token": s["bytes_per_new_token"],
                    "decode_per_token_per_sequence": s["decode_bytes_per_token_per_sequence"],
                    "min_decode_per_token_per_sequence": 2 * hidden * itemsize,
                }
                # cross-check our decode-step count against the summary's own timing ratio
                run["decode_steps_check"] = s["decode_phase_s"] / s["per_token_latency_s"] if s["per_token_latency_s"] else 0
            run["finish_reasons"] = {k: sum(r["finish_reason"] == k for r in records)
                                     for k in sorted({r["finish_reason"] for r in records})}
            run["token_ids"] = [r["token_ids"] for r in records]
            print(f"[T={length}/{label}] {run['tokens_per_s']:.2f} tok/s, {run['per_token_latency_s'] * 1e3:.1f} ms per "
                  f"decode step, finish {run['finish_reasons']} ({run['process_wall_s']:.0f}s; other processes used "
                  f"{run['foreign_cpu_frac']:.0%} of the cores meanwhile)", flush=True)

    return least_disturbed_run(f"T={length}/{label}", cmd, env, odir, args,
                               {"ranks": ranks, "torch_threads_per_rank": threads, "max_new_tokens": new}, finish)


def _compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Token identity over the common prefix of each pair (the baseline may generate fewer tokens)."""
    first = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        d = next((i for i in range(n) if x[i] != y[i]), None)
        first.append(d)
    return {"identical": len(a) == len(b) and all(d is None for d in first), "compared_tokens": [min(len(x), len(y)) for x, y in zip(a, b)],
            "first_mismatch": first}


def run_length(length: int, args, run_root: Path, tok, hidden: int, itemsize: int) -> dict:
    texts = build_prompts(tok, length, args.prompts)
    run_root.joinpath(f"T{length}").mkdir(parents=True, exist_ok=True)
    pfile = run_root / f"T{length}" / "prompts.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    runs = {label: run_mode(label, length, args, run_root, pfile, hidden, itemsize)
            for label in ("centralized", "kv", "nocache")}
    if args.breakdown:
        runs["breakdown"] = run_mode("breakdown", length, args, run_root, pfile, hidden, itemsize)
    # Split outputs come client-major (client c holds prompts c, c+C, ...); put them in prompt order.
    order = [i for c in range(args.clients) for i in range(c, len(texts), args.clients)]
    for label in ("kv", "nocache"):
        ids = [None] * len(texts)
        for pos, i in enumerate(order):
            ids[i] = runs[label]["token_ids"][pos]
        runs[label]["token_ids"] = ids
    cen_ids = runs["centralized"]["token_ids"]
    c, kv, nc = runs["centralized"], runs["kv"], runs["nocache"]
    return {
        "prompt_tokens": length, "prompts": len(texts), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "baseline_new_tokens": args.baseline_new_tokens,
        "runs": runs,
        "identity": {"kv_vs_centralized": _compare(kv["token_ids"], cen_ids),
                     "nocache_vs_centralized": _compare(nc["token_ids"], cen_ids),
                     "nocache_vs_kv": _compare(nc["token_ids"], kv["token_ids"])},
        "result": {
            "kv_tokens_per_s": kv["tokens_per_s"], "nocache_tokens_per_s": nc["tokens_per_s"],
            "centralized_tokens_per_s": c["tokens_per_s"],
            "kv_speedup_vs_nocache": kv["tokens_per_s"] / nc["tokens_per_s"],
            "kv_latency_speedup_vs_nocache": nc["per_token_latency_s"] / kv["per_token_latency_s"],
            "kv_speedup_target": 8.0,
            "kv_latency_vs_centralized": kv["per_token_latency_s"] / c["per_token_latency_s"],
            "kv_throughput_vs_centralized": kv["tokens_per_s"] / c["tokens_per_s"],
            "latency_target": 1.3,
            "kv_bytes_decode_ratio": kv["bytes"]["decode_ratio"], "kv_bytes_total_ratio": kv["bytes"]["total_ratio"],
            "nocache_bytes_decode_ratio": nc["bytes"]["decode_ratio"],
            "nocache_bytes_total_ratio": nc["bytes"]["total_ratio"],
            "bytes_target": 1.05,
        },
    }


def _table(results: list[dict]) -> str:
    lines = ["| T | mode | new tok/seq | tok/s | prompt step s | ms/token (decode step) | vs centralized latency | finish | "
             "decode B/token/seq (min) | decode bytes ratio | whole-run bytes ratio | tokens = centralized |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in results:
        c = r["runs"]["centralized"]
        for label, name in (("centralized", "centralized HF generate"), ("kv", "split, KV cache"),
                            ("nocache", "split, no cache (baseline)")):
            run = r["runs"][label]
            thr = run["torch_threads_per_rank"]
            thr = "/".join(f"{k} {v}" for k, v in thr.items()) if isinstance(thr, dict) else str(thr)
            b = run["bytes"]
            ident = "-" if label == "centralized" else (
                "yes" if r["identity"][f"{label}_vs_centralized"]["identical"] else "NO")
            if label == "nocache" and ident == "yes" and run["max_new_tokens"] < r["max_new_tokens"]:
                ident = f"yes (first {run['max_new_tokens']})"
            fin = ", ".join(f"{k} {v}" for k, v in run["finish_reasons"].items())
            lines.append(
                f"| {r['prompt_tokens']} | {name} ({run['ranks']} proc, {thr} thr) | {run['max_new_tokens']} "
                f"| {run['tokens_per_s']:.2f} | {run['prompt_phase_s']:.2f} | {run['per_token_latency_s'] * 1e3:.1f} "
                f"| {run['per_token_latency_s'] / c['per_token_latency_s']:.2f} | {fin} "
                + (f"| - | - | - " if b is None else
                   f"| {b['decode_per_token_per_sequence']:.0f} ({b['min_decode_per_token_per_sequence']}) "
                   f"| {b['decode_ratio']:.4f} | {b['total_ratio']:.4f} ")
                + f"| {ident} |")
    return "\n".join(lines)


def _breakdown_table(results: list[dict]) -> str:
    lines = ["| T | client A (embed + head blocks) | server B | client C (tail blocks + LM head) | compute sum "
             "| split measured | rest (wire + hand-offs) | centralized |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b = r["runs"].get("breakdown")
        if b is None:
            continue
        d, kv = b["decode_step_s"], r["runs"]["kv"]["per_token_latency_s"]
        lines.append(f"| {r['prompt_tokens']} | {d['client_a'] * 1e3:.1f} | {d['server_b'] * 1e3:.1f} "
                     f"| {d['client_c'] * 1e3:.1f} | {b['decode_compute_s'] * 1e3:.1f} | {kv * 1e3:.1f} "
                     f"| {(kv - b['decode_compute_s']) * 1e3:.1f} "
                     f"| {r['runs']['centralized']['per_token_latency_s'] * 1e3:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="128,512", help="prompt lengths in tokens (comma list)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per length")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--baseline-new-tokens", type=int, default=0,
                    help="new tokens for the kv_cache=false baseline (0 = --max-new-tokens; its steps grow with the "
                         "sequence, so fewer tokens understate its cost and the speed-up reported is a lower bound)")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--config", default="configs/generate.yaml", help="base config (split.* from it)")
    ap.add_argument("--model-dir", default=SMOLLM2_DIR)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is killed")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each run wait up to this many seconds for idle cores (0 = don't wait); "
                         "foreign CPU use during each run is recorded either way")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="rerun a mode when other processes used more than this fraction of the cores during it")
    ap.add_argument("--retries", type=int, default=1, help="reruns per mode when the machine was busy")
    ap.add_argument("--split-omp-threads", type=int, default=0,
                    help="OMP_NUM_THREADS=N on every split rank (default: the CLI's own choice)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the compute-only breakdown of the split decode step (one process, no wire)")
    ap.add_argument("--run-dir", default="", help="where run outputs go (default: a temp dir, deleted)")
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    args = ap.parse_args(argv)
    args.baseline_new_tokens = args.baseline_new_tokens or args.max_new_tokens
    if args.prompts % args.clients:
        ap.error("--prompts must be a multiple of --clients")

    import torch

    from fedsea_hpc.data.tokenizer import load_tokenizer

    if args.model_dir == SMOLLM2_DIR:
        ensure_smollm2()
    cfg = json.loads((REPO / args.model_dir / "config.json").read_text())
    hidden, itemsize = cfg["hidden_size"], torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    tok = load_tokenizer(str(REPO / args.model_dir))
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    tmp = None if args.run_dir else tempfile.TemporaryDirectory(prefix="fedsea_bench_gen_")
    run_root = Path(args.run_dir or tmp.name).resolve()
    t0 = time.perf_counter()
    try:
        results = [run_length(n, args, run_root, tok, hidden, itemsize) for n in lengths]
    finally:
        if tmp is not None:
            tmp.cleanup()
    doc = {
        "benchmark": "generate",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "benchmark_wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
        "model": args.model_dir, "dtype": args.dtype, "hidden_size": hidden, "itemsize": itemsize,
        "clients": args.clients, "servers": args.servers, "config": args.config,
        "note": "centralized: 1 process, OMP_NUM_THREADS=cpu_count, HF generate on build_model(); split: "
                "clients+servers ranks on the same cores (CLI thread default unless --split-omp-threads). "
                "tokens/s = new tokens / wall (prompt step + decode); per-token latency = decode phase / decode "
                "steps. The no-cache baseline generates baseline_new_tokens tokens (fewer than max_new_tokens = a lower "
                "bound of its cost).",
        "results": results,
    }
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(_table(results))
    if args.breakdown:
        print("\nwhere a split decode step goes (ms; compute timed in one process with the split's parts and "
              f"{results[0]['runs']['breakdown']['torch_threads']} threads, no wire):")
        print(_breakdown_table(results))
    print()
    for r in results:
        s = r["result"]
        print(f"T={r['prompt_tokens']}: KV cache {s['kv_speedup_vs_nocache']:.1f}x the baseline's tokens/s "
              f"({s['kv_latency_speedup_vs_nocache']:.1f}x per-token latency; target >= 8 at 512), "
              f"{s['kv_latency_vs_centralized']:.2f}x centralized per-token latency (target <= 1.3), "
              f"{s['kv_throughput_vs_centralized']:.2f}x centralized tokens/s; bytes: decode "
              f"{s['kv_bytes_decode_ratio']:.4f}x, whole run {s['kv_bytes_total_ratio']:.4f}x the minimum "
              f"(target <= 1.05)")
        for label, run in r["runs"].items():
            if run["foreign_cpu_frac"] > args.max_foreign:
                print(f"WARNING: T={r['prompt_tokens']}/{label}: other processes used {run['foreign_cpu_frac']:.0%} "
                      "of the cores during the run; its times are inflated")
            if any(k != "length" for k in run.get("finish_reasons", {})):
                print(f"NOTE: T={r['prompt_tokens']}/{label}: finish reasons {run['finish_reasons']}")
        for k, v in r["identity"].items():
            if not v["identical"]:
                print(f"WARNING: T={r['prompt_tokens']}: {k}: outputs differ (first mismatch per prompt "
                      f"{v['first_mismatch']})")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
