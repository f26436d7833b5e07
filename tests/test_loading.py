"""Tests for fedsea_hpc.model.loading: 'tiny', checkpoint dirs, GGUF cache, errors, SmolLM2 (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedsea_hpc.model import loading
from fedsea_hpc.model.loading import ModelLoadError, resolve_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97


def tiny(seed: int = 0, **overrides):
    return resolve_model("tiny", tiny_vocab_size=VOCAB, seed=seed, tiny_overrides=overrides)


def layer_keys(src, *layers: int) -> list[str]:
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    return [k for k in src.keys() if k.startswith(prefixes)]


def test_tiny_config_is_gqa():
    cfg = tiny_config(VOCAB)
    assert cfg.model_type == "llama" and cfg.vocab_size == VOCAB
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.tie_word_embeddings


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    # Prepare
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    # Execute
    a = tiny(seed=7)
    ta = a.load_tensors(a.keys())
    after = torch.get_rng_state()
    torch.rand(1000)  # move the global RNG: must not matter
    b = tiny(seed=7)
    tb = b.load_tensors(b.keys())
    tc = tiny(seed=8).load_tensors(["model.layers.0.mlp.up_proj.weight"])
    # Assert
    assert torch.equal(before, after)
    assert a.kind == "tiny" and a.path is None and a.tokenizer_path == "tiny"
    assert list(ta) == list(tb) == a.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(tc["model.layers.0.mlp.up_proj.weight"],
                           ta["model.layers.0.mlp.up_proj.weight"])


def test_tiny_is_bit_identical_in_another_process():
    code = ("from fedsea_hpc.model.loading import resolve_model\n"
            f"s = resolve_model('tiny', tiny_vocab_size={VOCAB}, seed=5)\n"
            "import hashlib\n"
            "t = s.load_tensors(['model.layers.1.self_attn.k_proj.weight'])\n"
            "print(hashlib.sha256(next(iter(t.values())).numpy().tobytes()).hexdigest())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    here = tiny(seed=5).load_tensors(["model.layers.1.self_attn.k_proj.weight"])
    import hashlib

    assert out == hashlib.sha256(next(iter(here.values())).numpy().tobytes()).hexdigest()


def test_load_tensors_returns_only_requested_and_matches_full_model():
    src = tiny(seed=3)
    full = src.build_model().state_dict()
    names = layer_keys(src, 2, 3) + ["model.norm.weight"]
    got = src.load_tensors(names)
    assert list(got) == names
    assert len(names) == 2 * 9 + 1  # 4 attn + 3 mlp + 2 norms per layer
    for k in names:
        assert torch.equal(got[k], full[k]), k


def test_tiny_full_model_runs():
    model = tiny(seed=0).build_model()
    logits = model(torch.randint(0, VOCAB, (2, 5))).logits
    assert logits.shape == (2, 5, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_dir_checkpoint_round_trips(tmp_path, shard):
    # Prepare: a tiny model saved the way HF saves real checkpoints
    model = tiny(seed=11).build_model()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    # Execute
    src = resolve_model(str(tmp_path), tiny_vocab_size=1, seed=0)
    names = layer_keys(src, 4) + ["model.embed_tokens.weight"]
    got = src.load_tensors(names)
    # Assert
    state = model.state_dict()
    assert src.kind == "dir" and src.path == str(tmp_path) and src.tokenizer_path == str(tmp_path)
    assert src.config.num_hidden_layers == 6 and src.config.num_key_value_heads == 2
    assert set(src.keys()) == set(state)
    assert list(got) == names
    assert all(torch.equal(got[k], state[k]) for k in names)
    assert src.build_model().state_dict().keys() == state.keys()


def test_tied_lm_head_is_served_from_embedding(tmp_path):
    tiny(seed=2).build_model().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # HF drops the tied copy
    src = resolve_model(str(tmp_path), tiny_vocab_size=1, seed=0)
    got = src.load_tensors(["lm_head.weight"])
    emb = src.load_tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert list(got) == ["lm_head.weight"] and torch.equal(got["lm_head.weight"], emb)
    t = tiny(seed=2)
    both = t.load_tensors(["lm_head.weight", "model.embed_tokens.weight"])
    assert torch.equal(both["lm_head.weight"], both["model.embed_tokens.weight"])


def test_untied_tiny_has_its_own_head():
    src = tiny(seed=2, tie_word_embeddings=False)
    got = src.load_tensors(["lm_head.weight", "model.embed_tokens.weight"])
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_tiny_overrides_change_shape():
    src = tiny(num_hidden_layers=2, hidden_size=32)
    assert src.config.num_hidden_layers == 2
    assert not layer_keys(src, 2)
    assert src.load_tensors(["model.norm.weight"])["model.norm.weight"].shape == (32,)


@pytest.mark.parametrize("name", ["/nonexistent/model-dir", "./missing", ""])
def test_missing_path_errors(name):
    with pytest.raises(ModelLoadError, match="model.name_or_path"):
        resolve_model(name, tiny_vocab_size=1, seed=0)


def test_non_llama_config_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="gpt2"):
        resolve_model(str(tmp_path), tiny_vocab_size=1, seed=0)


def test_dir_without_config_or_weights_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(tmp_path), tiny_vocab_size=1, seed=0)
    tiny_config(VOCAB).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        resolve_model(str(tmp_path), tiny_vocab_size=1, seed=0)


def test_unknown_key_errors():
    with pytest.raises(ModelLoadError, match="model.layers.99"):
        tiny().load_tensors(["model.norm.weight", "model.layers.99.mlp.up_proj.weight"])


def test_non_gguf_file_errors(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model(str(f), tiny_vocab_size=1, seed=0)


def test_hub_failure_is_a_model_load_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="hub") as err:
        resolve_model("some-org/some-llama", tiny_vocab_size=1, seed=0)
    assert "\n" not in str(err.value)


def test_gguf_conversion_is_cached_and_race_safe(tmp_path, monkeypatch):
    # Prepare: a fake .gguf whose "conversion" writes a tiny checkpoint and counts calls
    gguf = tmp_path / "fake-model.gguf"
    gguf.write_bytes(b"GGUF")
    model = tiny(seed=4).build_model()
    calls = []

    def fake_convert(path, dest, name):
        calls.append(dest)
        model.save_pretrained(dest)

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    # Execute: two racing resolvers, then a third after both finished
    out = [None, None]

    def resolve(i):
        out[i] = resolve_model(str(gguf), tiny_vocab_size=1, seed=0, cache_dir=str(cache))

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    third = resolve_model(str(gguf), tiny_vocab_size=1, seed=0, cache_dir=str(cache))
    # Assert: one published dir, no temp dirs left, the third call did no work
    assert 1 <= len(calls) <= 2
    assert out[0].path == out[1].path == third.path
    assert third.kind == "gguf" and Path(third.path).name.startswith("fake-model-4-")
    assert [p.name for p in cache.iterdir()] == [Path(third.path).name]
    w = third.load_tensors(["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(w["model.layers.0.mlp.down_proj.weight"],
                       model.state_dict()["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.slow
def test_smollm2_loads_and_answers(smollm2_dir):
    from transformers import AutoTokenizer

    src = resolve_model(smollm2_dir, tiny_vocab_size=1, seed=0)
    cfg = src.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and "lm_head.weight" in src.keys()
    part = src.load_tensors(layer_keys(src, 29) + ["model.norm.weight", "lm_head.weight"])
    assert len(part) == 11 and part["lm_head.weight"].shape == (49152, 576)

    model = src.build_model()
    tok = AutoTokenizer.from_pretrained(src.tokenizer_path)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
