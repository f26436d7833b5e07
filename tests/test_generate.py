"""``fedsea generate`` under ``mpiexec``: greedy outputs equal HF ``generate`` on the unsplit model.

The shipped 'tiny' model's small random weights make greedy decoding repeat the last prompt
token, which would hide position or cache bugs; these tests save a tiny random Llama with
larger, untied weights as an HF dir (with the byte tokenizer), whose greedy outputs vary and
sometimes hit EOS early. Launches cost ~15 s each on 2 cores, so runs are few and cached.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import COMMON_ARGS, MPIEXEC, REPO, check_ok, subprocess_env

pytestmark = pytest.mark.multirank

PROMPTS = REPO / "tests" / "data" / "prompts_tiny.jsonl"
NEW = 12


def generate_command(args: list[str], n: int) -> list[str]:
    return [str(MPIEXEC), "-n", str(n), sys.executable, "-m", "fedsea_hpc", "generate", *COMMON_ARGS, *args]


def run_generate(args: list[str], n: int, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(generate_command(args, n), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_generations(out: Path, clients: int) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / f"generations-client{c}.jsonl").read_text().splitlines()]
            for c in range(clients)]


def hf_reference(model, tok, prompts: list[str], clients: int, batch_size: int, new: int,
                 chat: bool = False) -> list[list[list[int]]]:
    """Per client, per prompt: HF greedy new tokens (up to and including EOS), batched like the client."""
    out = []
    for c in range(clients):
        mine, ids_c = prompts[c::clients], []
        for i in range(0, len(mine), batch_size):
            if chat:
                texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in mine[i:i + batch_size]]
                enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            else:
                enc = [tok(p)["input_ids"] for p in mine[i:i + batch_size]]
            t = max(map(len, enc))
            ids = torch.tensor([[tok.pad_token_id] * (t - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (t - len(e)) + [1] * len(e) for e in enc])
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row in gen[:, t:].tolist():
                ids_c.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
        out.append(ids_c)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 6-block tiny Llama with std-0.3 untied weights, saved as an HF dir with the byte tokenizer."""
    from transformers import LlamaForCausalLM

    from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, build_byte_tokenizer
    from fedsea_hpc.model.loading import tiny_config

    d = tmp_path_factory.mktemp("tinyllama")
    cfg = tiny_config(TINY_VOCAB_SIZE, tie_word_embeddings=False, initializer_range=0.3, max_position_embeddings=64)
    tok = build_byte_tokenizer()
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir):
    from transformers import AutoTokenizer

    from fedsea_hpc.model.loading import resolve_model

    model = resolve_model(str(tiny_dir), tiny_vocab_size=0, seed=0).build_model()
    model.generation_config.eos_token_id = None  # only what the test passes
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    return model, tok, prompts


class Runs:
    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir, self.cache = root, model_dir, {}

    def get(self, name: str, clients: int, servers: int, args: list[str]) -> Path:
        if name not in self.cache:
            out = self.root / name
            proc = run_generate([f"model.name_or_path={self.model_dir}", f"topology.clients={clients}",
                                 f"topology.servers={servers}", f"generate.prompts_files={PROMPTS}",
                                 f"generate.max_new_tokens={NEW}", f"run.output_dir={out}", *args],
                                clients + servers)
            check_ok(proc)
            self.cache[name] = (out, proc)
        return self.cache[name][0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir, mpiexec_path) -> Runs:
    return Runs(tmp_path_factory.mktemp("gen"), tiny_dir)


CASES = {
    # name: (clients, servers, batch_size, extra args)
    "c2s1": (2, 1, 3, []),  # 4 + 3 prompts: batches 3+1 vs 3 (different batch counts)
    "c2s1-nocache": (2, 1, 3, ["generate.kv_cache=false"]),
    # DeepSpeed's first init may compile its shm op (~35 s): a longer peer timeout for this one.
    "c3s2-z3-mixed": (3, 2, 2, ["deepspeed.zero_stage=3", "split.per_client=[[1,1],[2,2],[3,1]]",
                                "comm.timeout_s=120"]),
    "c1s1-p4": (1, 1, 4, ["split.head_layers=4", "split.tail_layers=1"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_hf_generate(runs, tiny_ref, name):
    clients, servers, bs, extra = CASES[name]
    out = runs.get(name, clients, servers, [f"generate.batch_size={bs}", *extra])
    model, tok, prompts = tiny_ref
    want = hf_reference(model, tok, prompts, clients, bs, NEW)
    got = read_generations(out, clients)
    for c in range(clients):
        assert [r["prompt"] for r in got[c]] == prompts[c::clients]  # input order
        assert [r["token_ids"] for r in got[c]] == want[c], f"client {c}"
        for r, ids in zip(got[c], want[c]):
            reason = "eos" if ids[-1] == tok.eos_token_id else "length"
            assert r["finish_reason"] == reason and len(ids) <= NEW
            assert r["completion"] == tok.decode(ids, skip_special_tokens=True)
    assert any(r["finish_reason"] == "eos" for g in got for r in g)  # the early-stop path ran
    s = json.loads((out / "generate_summary.json").read_text())
    assert s["server_forwards"] % servers == 0  # lockstep: every server rank made the same number of calls
    if name == "c3s2-z3-mixed":  # server 1's only client finishes a batch earlier: it idles with dummy rows
        assert s["server_dummy_forwards"] > 0


def test_summary_and_wire_bytes(runs):
    out = runs.get("c2s1", *CASES["c2s1"][:2], ["generate.batch_size=3"])
    s = json.loads((out / "generate_summary.json").read_text())
    assert s["sequences"] == 7 and s["new_tokens"] > 0 and s["tokens_per_s"] > 0 and s["per_token_latency_s"] > 0
    # Each decode step: [B, 1, 64] float32 each way plus two 96-byte headers per client batch.
    assert 2 * 64 * 4 <= s["decode_bytes_per_token_per_sequence"] <= 2 * 64 * 4 + 2 * 96
    nc = runs.get("c2s1-nocache", *CASES["c2s1-nocache"][:2], ["generate.batch_size=3", "generate.kv_cache=false"])
    s2 = json.loads((nc / "generate_summary.json").read_text())
    assert s2["decode_bytes_per_token_per_sequence"] > 5 * s["decode_bytes_per_token_per_sequence"]


def test_noise_changes_outputs(runs, tiny_ref):
    out = runs.get("c1s1-noise", 1, 1, ["generate.noise=true", "privacy.noise_std=0.5", "generate.batch_size=4"])
    model, tok, prompts = tiny_ref
    got = read_generations(out, 1)[0]
    want = hf_reference(model, tok, prompts, 1, 4, NEW)[0]
    assert [r["token_ids"] for r in got] != want
    assert json.loads((out / "generate_summary.json").read_text())["noise_std"] == 0.5


def _stop_string(tok, greedy: list[list[int]]) -> str:
    """An alphanumeric ASCII character the greedy completions contain after their first character
    (so the stop cuts a non-empty completion short). Byte-level tokens: an ASCII byte decodes alone."""
    for ids in greedy:
        text = tok.decode(ids, skip_special_tokens=True)
        for ch in text[1:]:
            if ch.isascii() and ch.isalnum():
                return ch
    raise AssertionError(f"no ASCII letter or digit in the greedy completions: {greedy}")


def test_stop_strings_cut_the_completion(runs, tiny_ref):
    """Greedy (noise-free) decoding with a stop string taken from its own output: rows that reach
    it end there with finish_reason 'stop' and the completion cut before it; the others are unchanged."""
    model, tok, prompts = tiny_ref
    greedy = hf_reference(model, tok, prompts, 1, 4, NEW)[0]
    stop = _stop_string(tok, greedy)
    got = read_generations(runs.get("c1s1-stop", 1, 1, ["generate.batch_size=4", f"generate.stop=[{stop}]"]), 1)[0]
    assert len(got) == len(greedy)
    for r, ids in zip(got, greedy):
        # The first prefix of the greedy tokens whose text contains the stop string, if any.
        n = next((n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n], skip_special_tokens=True)), None)
        assert stop not in r["completion"], r
        if n is None:
            assert r["token_ids"] == ids and r["finish_reason"] in ("eos", "length"), r
        else:
            text = tok.decode(ids[:n], skip_special_tokens=True)
            assert r["token_ids"] == ids[:n] and r["finish_reason"] == "stop", (r, ids)
            assert r["completion"] == text[:text.index(stop)], r
    assert any(r["finish_reason"] == "stop" for r in got), (stop, got)


SAMPLING = ["generate.temperature=1.0", "generate.top_k=40", "generate.top_p=0.9", "generate.batch_size=4"]


def test_sampling_runs_and_is_seeded(runs, tiny_ref):
    def sample(name: str, seed: int) -> list[list[int]]:
        got = read_generations(runs.get(name, 1, 1, [*SAMPLING, f"generate.seed={seed}"]), 1)[0]
        assert all(1 <= len(r["token_ids"]) <= NEW and r["finish_reason"] in ("eos", "length") for r in got)
        return [r["token_ids"] for r in got]

    first, again, other = sample("c1s1-sample", 0), sample("c1s1-sample-again", 0), sample("c1s1-sample-seed1", 1)
    model, tok, prompts = tiny_ref
    assert first != hf_reference(model, tok, prompts, 1, 4, NEW)[0]  # it sampled, not greedy
    assert again == first  # same seed, separate launch: the same tokens
    assert other != first  # another seed: other tokens


def _merged_reference(tiny_dir: Path, adapters: Path):
    """The unsplit HF model with client0's and the server's LoRA adapters merged into its weights."""
    from safetensors.torch import load_file

    from fedsea_hpc.model.loading import resolve_model

    model = resolve_model(str(tiny_dir), tiny_vocab_size=0, seed=0).build_model()
    params = dict(model.named_parameters())
    for part in ("client0", "server"):
        conf = json.loads((adapters / part / "adapter_config.json").read_text())
        scale = conf["lora_alpha"] / conf["r"]
        state = load_file(str(adapters / part / "adapter_model.safetensors"))
        with torch.no_grad():
            for k, a in state.items():
                if ".lora_A." in k:
                    b = state[k.replace(".lora_A.", ".lora_B.")]
                    name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                    params[name] += scale * b @ a
    return model


def test_adapters_from_training(runs, tiny_dir, tiny_ref, tmp_path):
    from conftest import run_fedsea

    train_out = tmp_path / "train"
    proc = run_fedsea([f"model.name_or_path={tiny_dir}", "peft.lora_r=4", "train.steps=3", "train.lr=0.05",
                       "train.seq_len=48", "train.micro_batch_size=2", "privacy.noise_std=0",
                       # the partition moves live to q=2 before the last step: generation (run with
                       # the default split.*) must follow the saved adapters/partition.json
                       "debug.partition_schedule=[[2,1,2]]", f"run.output_dir={train_out}"], n=3)
    check_ok(proc)
    adapters = train_out / "adapters"
    assert json.loads((adapters / "partition.json").read_text()) == {"splits": [[1, 2], [1, 2]]}
    out = runs.get("c2s1-adapters", 2, 1, ["generate.batch_size=4", f"generate.adapters_dir={adapters}"])
    _, tok, prompts = tiny_ref
    want = hf_reference(_merged_reference(tiny_dir, adapters), tok, prompts, 2, 4, NEW)
    got = read_generations(out, 2)
    assert [[r["token_ids"] for r in g] for g in got] == want
    base = read_generations(runs.get("c2s1", *CASES["c2s1"][:2], ["generate.batch_size=3"]), 2)
    assert [[r["token_ids"] for r in g] for g in got] != [[r["token_ids"] for r in g] for g in base]
    # The same adapters on another model: one line, exit 2, every rank.
    proc = run_generate(["model.name_or_path=tiny", "model.tiny_hidden_size=32", "topology.clients=2",
                         "topology.servers=1", f"generate.prompts_files={PROMPTS}", f"generate.adapters_dir={adapters}",
                         f"run.output_dir={tmp_path / 'bad'}"], 3, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "fedsea: error: generate.adapters_dir" in ln]
    assert sorted(ln.split("]")[0] for ln in errors) == [f"[rank {r}" for r in range(3)], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ bad input: exit 2 on every rank

def _bad(tiny_dir, tmp_path, *args) -> subprocess.CompletedProcess:
    proc = run_generate([f"model.name_or_path={tiny_dir}", "topology.clients=1", "topology.servers=1",
                         f"run.output_dir={tmp_path}", *args], 2, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "fedsea: error:" in ln]
    # Every rank validates and exits 2 before any communication: one line per rank.
    assert sorted(ln.split("]")[0] for ln in errors) == ["[rank 0", "[rank 1"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_bad_inputs_exit_2(tiny_dir, tmp_path, mpiexec_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 60 + "\n"}) + "\n")
    assert "max_position_embeddings" in _bad(tiny_dir, tmp_path, f"generate.prompts_files={long}").stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok\\n"}\n{"text": 3}\n')
    assert "line 2" in _bad(tiny_dir, tmp_path, f"generate.prompts_files={bad}").stderr
    assert "no such file" in _bad(tiny_dir, tmp_path, "generate.prompts_files=/nonexistent.jsonl").stderr


@pytest.mark.slow
def test_smollm2_matches_hf_generate(tmp_path, mpiexec_path, smollm2_dir):
    smollm2 = Path(smollm2_dir)
    from transformers import AutoTokenizer

    from fedsea_hpc.model.loading import resolve_model

    msgs = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Name a color."}],
            [{"role": "user", "content": "Say hi in one word, please."}]]
    pf = tmp_path / "chat.jsonl"
    pf.write_text("".join(json.dumps({"messages": m}) + "\n" for m in msgs))
    out = tmp_path / "run"
    proc = run_generate([f"model.name_or_path={smollm2}", "topology.clients=2", "topology.servers=1",
                         "split.head_layers=3", "split.tail_layers=5", f"generate.prompts_files={pf}",
                         "generate.max_new_tokens=8", "generate.batch_size=2", f"run.output_dir={out}"], 3, timeout=400)
    check_ok(proc)
    tok = AutoTokenizer.from_pretrained(smollm2)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = resolve_model(str(smollm2), tiny_vocab_size=0, seed=0).build_model()
    want = hf_reference(model, tok, msgs, 2, 2, 8, chat=True)
    got = read_generations(out, 2)
    assert [[r["token_ids"] for r in g] for g in got] == want
