"""The GPU path of devices per role (README, Devices per role): CPU clients with a GPU server.

Marked ``gpu`` and skipped where no GPU is visible (CI has none): run it on a GPU machine with
``launch/test.sh -m gpu``, or ``benchmarks/gpu_check.sh``, which also records the results. One
GPU is enough: the server ranks share it, the clients run on the CPU, messages go through host
memory (gloo) and the server group is NCCL.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import check_ok, load_summary, run_fedsea
from test_generate import run_generate

pytestmark = [pytest.mark.gpu, pytest.mark.multirank,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (torch.cuda.is_available())")]

MIXED = ["topology.client_device=cpu", "topology.server_device=cuda"]


def test_cpu_clients_gpu_server_smollm2_bf16_loss_goes_down(tmp_path, mpiexec_path, smollm2_dir):
    out = tmp_path / "bf16"
    check_ok(run_fedsea([*MIXED, f"model.name_or_path={smollm2_dir}", "model.dtype=bfloat16", "topology.clients=2",
                         "topology.servers=1", "peft.lora_r=8", "train.seq_len=128", "train.micro_batch_size=4",
                         "train.steps=20", "train.lr=1e-3", f"run.output_dir={out}"], n=3, timeout=900))
    s = load_summary(out)
    assert s["memory"]["measure"] == {"client": "rss", "server": "cuda_max_allocated"}
    assert sum(s["losses"][-5:]) / 5 < s["losses"][0] - 0.05, s["losses"]


def test_split_on_a_gpu_server_equals_centralized_on_the_gpu_in_fp32(tmp_path, mpiexec_path):
    exact = ["privacy.noise_std=0", "federated.avg_every=1", "train.steps=10", "train.lr=1e-3", "topology.clients=2",
             "model.dtype=float32"]
    split, central = tmp_path / "split", tmp_path / "central"
    check_ok(run_fedsea([*exact, *MIXED, "topology.servers=1", f"run.output_dir={split}"], n=3, timeout=600))
    check_ok(run_fedsea([*exact, "train.mode=centralized", f"run.output_dir={central}"], n=None, timeout=600))
    a, b = load_summary(split)["losses"], load_summary(central)["losses"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_generation_with_a_gpu_server(tmp_path, mpiexec_path, smollm2_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    out = tmp_path / "gen"
    check_ok(run_generate([*MIXED, f"model.name_or_path={smollm2_dir}", "topology.clients=1", "topology.servers=1",
                           f"generate.prompts_files={prompts}", "generate.max_new_tokens=12",
                           f"run.output_dir={out}"], 2, timeout=600))
    rec = json.loads(Path(out / "generations-client0.jsonl").read_text().splitlines()[0])
    assert "Paris" in rec["completion"], rec
