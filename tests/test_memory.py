"""Client memory per block (adapt.memory): the static count, the start-up budget check, the
activation counter, and the planner keeping a budget when rebalancing."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from fedsea_hpc.adapt.memory import MiB, SavedBytes, check_budgets, static_memory
from fedsea_hpc.adapt.rebalance import Rebalancer
from fedsea_hpc.config import ConfigError, PeftConfig, load_config
from fedsea_hpc.model.lora import apply_lora, trainable

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)


@pytest.mark.parametrize("lora_r", [0, 8])
def test_static_memory_counts_a_real_block(lora_r):
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleDict({"0": LlamaDecoderLayer(CONFIG, layer_idx=0)})

    part = apply_lora(One(), PeftConfig(lora_r=lora_r), seed=0)
    base = sum(p.numel() for n, p in part.named_parameters() if "lora_" not in n)
    trained = sum(p.numel() for _, p in trainable(part))
    want = (base + 4 * trained) * 4 if lora_r else 4 * base * 4  # what trains: itself, grad, 2 moments
    got = static_memory(CONFIG, torch.float32, lora_r, PeftConfig().target_modules)
    assert got.block_mb * MiB == want
    assert got.fixed_mb * MiB == (512 * 64 + 64) * 4 * (1 if lora_r else 4)  # tied head: the embedding once


def test_budgets_are_checked_at_start():
    mem = static_memory(CONFIG, torch.float32, 8, PeftConfig().target_modules)
    fits = mem.need(2) + 0.01
    check_budgets(load_config(None, [f"split.client_memory_mb=[{fits}, null]"]), CONFIG, torch.float32)
    with pytest.raises(ConfigError, match=r"split\.client_memory_mb: client 0's budget .* below the .* MiB that even "
                                          r"its smallest split \(p \+ q = 2\) needs"):
        check_budgets(load_config(None, [f"split.client_memory_mb=[{mem.need(2) - 0.01}, null]"]), CONFIG,
                      torch.float32)
    cfg = load_config(None, [f"split.client_memory_mb=[null, {fits}]", "split.per_client=[[1,1],[2,2]]"])
    with pytest.raises(ConfigError, match=r"split\.per_client\[1\]: p \+ q = 4 needs .* use at most 2 blocks"):
        check_budgets(cfg, CONFIG, torch.float32)


@pytest.mark.parametrize("value,message", [
    ("[100]", r"split\.client_memory_mb: must be \[\] or one budget per client \(2\)"),
    ("[100, -1]", r"split\.client_memory_mb: .* each a number > 0"),
    ("[100, true]", r"split\.client_memory_mb"),
])
def test_bad_budgets_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"split.client_memory_mb={value}"])


def test_saved_bytes_grow_with_the_batch():
    layer = torch.nn.Linear(16, 16)
    counts = []
    for rows in (2, 4):
        with SavedBytes() as s:
            layer(torch.randn(rows, 16, requires_grad=True)).relu().sum()
        counts.append(s.bytes)
    assert counts[0] > 0 and counts[1] == 2 * counts[0]
    with SavedBytes() as s:  # outside autograd nothing is saved
        with torch.no_grad():
            layer(torch.randn(4, 16)).relu()
    assert s.bytes == 0


def test_a_rebalance_keeps_the_budget():
    costs = {"client_block_s": [0.01, 0.04], "client_fixed_s": [0.005, 0.005], "wire_s": [0.001, 0.001],
             "server_block_s": [0.01, 0.01], "client_block_mb": [10.0, 10.0], "client_fixed_mb": [50.0, 50.0]}
    free = Rebalancer(load_config(None, ["split.rebalance=once", "split.rebalance_min_gain=1.0"]), 30)
    new, _ = free._plan(5, costs)
    assert sum(new[0][0]) > 5  # unconstrained, the fast client takes many blocks
    tight = Rebalancer(load_config(None, ["split.rebalance=once", "split.rebalance_min_gain=1.0",
                                          "split.client_memory_mb=[100, null]"]), 30)
    new, _ = tight._plan(5, costs)
    assert 50 + 10 * sum(new[0][0]) <= 100
    broke = Rebalancer(load_config(None, ["split.rebalance=once", "split.client_memory_mb=[60, null]"]), 30)
    new, rec = broke._plan(5, costs)  # activations outgrew the budget: keep the partition, say why
    assert new is None and rec["reason"].startswith("no partition fits: split.client_memory_mb: client 0")
