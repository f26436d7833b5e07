"""The real entry point under ``mpiexec`` on gloo/CPU with the tiny Llama.

Launches are expensive (~15-25 s each on 2 cores: imports + DeepSpeed), so runs are cached per
module and shared between assertions. Every launch passes ``run.progress=false`` and
``comm.timeout_s=30`` (see conftest) and a fresh output dir, under a subprocess timeout.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, check_ok, load_metrics, load_summary, run_fedsea

pytestmark = pytest.mark.multirank

L = 6
LR, STEPS = 1e-3, 20
EXACT = ["privacy.noise_std=0", "federated.avg_every=1", f"train.steps={STEPS}", f"train.lr={LR}"]
TOPOLOGIES = [(2, 2), (3, 1)]
ZERO_STAGES = [0, 1, 2, 3]
METRIC_KEYS = {"step", "loss", "tokens", "samples", "step_time_s", "bytes_sent", "bytes_sent_by_kind", "phase_s"}
HEADER_BYTES = 96  # 12 int64 per message
DEFAULT_CONFIG = "configs/default.yaml"  # what launch/local.sh runs
DEFAULT_STEPS = 40


# ------------------------------------------------------------------ cached runs


class Runs:
    """Lazily launched runs, keyed by name, shared by every test of this module."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, Path] = {}

    def get(self, name: str, args: list[str], n: int | None, timeout: float = 300, config: str | None = None) -> Path:
        if name not in self.cache:
            out = self.root / name
            proc = run_fedsea([*args, f"run.output_dir={out}"], n=n, timeout=timeout, config=config)
            check_ok(proc)
            self.cache[name] = out
        return self.cache[name]

    def centralized(self, clients: int) -> Path:
        return self.get(f"central-c{clients}", [*EXACT, "train.mode=centralized", f"topology.clients={clients}"], None)

    def parallel(self, clients: int, servers: int, zero: int) -> Path:
        return self.get(f"par-c{clients}s{servers}z{zero}",
                        [*EXACT, f"topology.clients={clients}", f"topology.servers={servers}",
                         f"deepspeed.zero_stage={zero}"], clients + servers)

    def default(self) -> Path:
        """The README's default job, ``configs/default.yaml`` (3 clients x 1 server, full fine-tuning,
        ZeRO-2, the default relative noise, secure aggregation), cut to 40 of its 100 steps."""
        return self.get("default", [f"train.steps={DEFAULT_STEPS}"], 4, config=DEFAULT_CONFIG)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mpiexec_path) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"))


def adapter_tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def adapter_layers(d: Path) -> set[int]:
    out = set()
    for k in adapter_tensors(d):
        parts = k.split(".")
        out.add(int(parts[parts.index("layers") + 1]))
    return out


# ------------------------------------------------------------------ exactness (the key claim)


@pytest.mark.parametrize("zero", ZERO_STAGES)
@pytest.mark.parametrize("clients,servers", TOPOLOGIES)
def test_split_training_equals_centralized(runs, clients, servers, zero):
    ref = load_summary(runs.centralized(clients))
    out = runs.parallel(clients, servers, zero)
    got = load_summary(out)
    assert got["mode"] == "parallel" and ref["mode"] == "centralized"
    assert got["secure_aggregation"] is (clients >= 3)  # 3 clients: the sums below were masked
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    assert got["tokens_total"] == ref["tokens_total"] and got["samples_total"] == ref["samples_total"]
    diffs = [abs(a - b) for a, b in zip(got["losses"], ref["losses"])]
    assert max(diffs) < 1e-4, f"per-step |split - centralized| = {diffs}"
    assert got["losses"][-1] < got["losses"][0]  # it trained, not just agreed at step 1

    # The trained adapters agree too: every client holds the same Part A/C adapter (FedSGD), and
    # client + server adapters are the centralized adapter cut at the split (ZeRO-3 saves gathered).
    central = adapter_tensors(runs.centralized(clients) / "adapters" / "centralized")
    server = adapter_tensors(out / "adapters" / "server")
    assert adapter_layers(out / "adapters" / "server") == {1, 2, 3, 4}
    for c in range(clients):
        client = adapter_tensors(out / "adapters" / f"client{c}")
        assert adapter_layers(out / "adapters" / f"client{c}") == {0, 5}
        merged = {**client, **server}
        assert set(merged) == set(central)
        for k, t in merged.items():
            assert t.shape == central[k].shape, k
            # Adam normalises near-zero gradients, so rounding can move a single weight by up to lr
            # per step (1.5e-3 on one of 512, CPU-dependent); a lost or un-gathered shard misses the
            # update on every element (~1e-2). So: a small mean, and Adam's bound on the worst one.
            diff = (t - central[k]).abs()
            assert diff.mean() < 1e-4, f"client{c}: {k}: mean |split - centralized| = {diff.mean():.2e}"
            assert diff.max() <= 2 * LR * STEPS, f"client{c}: {k}: max |split - centralized| = {diff.max():.2e}"
        assert all(t.abs().sum() > 0 for k, t in merged.items() if "lora_B" in k), "lora_B left at its zero init"


# ------------------------------------------------------------------ default config trains


def test_default_config_loss_goes_down(runs):
    s = load_summary(runs.default())
    losses = s["losses"]
    assert len(losses) == DEFAULT_STEPS and all(l == l and l < 20 for l in losses)  # finite
    # A drop of 1.5 in 40 steps is far beyond run-to-run noise (the default job's full recorded
    # curve: benchmarks/results/default_job.json).
    tail = sum(losses[-5:]) / 5
    assert tail < losses[0] - 1.5, losses
    assert s["final_loss"] == losses[-1] and s["first_loss"] == losses[0]


# ------------------------------------------------------------------ what crosses the wire


def _expected_bytes_per_step(out: Path, steps: int) -> list[dict]:
    """Per step, from the data alone: what client c must send/receive for its batch: its real
    tokens only (sum of its lengths), never the padding of its [B_c, T_c] batch."""
    from fedsea_hpc.config import load_config
    from fedsea_hpc.data.dataset import ClientData
    from fedsea_hpc.data.tokenizer import load_tokenizer

    cfg = load_config(str(out / "config.yaml"))
    tok = load_tokenizer("tiny")
    h, c_n = cfg.model.tiny_hidden_size, cfg.topology.clients
    streams = [ClientData(cfg.data.train_files, c, c_n, tok, cfg.train.seq_len, cfg.run.seed)
               .batches(cfg.train.micro_batch_size) for c in range(c_n)]
    rows = []
    for _ in range(steps):
        batches = [next(s) for s in streams]
        # h_A up + h_B down (float32, real tokens), and the same two shapes for the gradients.
        hidden = sum(2 * int(b.lengths.sum()) * h * 4 for b in batches)
        assert any(int(b.lengths.sum()) < b.input_ids.numel() for b in batches)  # padding to leave out
        samples = sum(b.input_ids.shape[0] for b in batches)
        rows.append({"activation": hidden, "gradient": hidden, "lengths": 8 * samples, "control": 0,
                     # per client: lengths, h_A, h_B, dL/dh_B, dL/dh_A
                     "header": 5 * HEADER_BYTES * c_n, "samples": samples})
    return rows


@pytest.mark.parametrize("which", ["default_noise", "noise0"])
def test_wire_bytes_are_exactly_hidden_states_and_lengths(runs, which):
    out = runs.default() if which == "default_noise" else runs.parallel(2, 2, 0)
    metrics = load_metrics(out)
    expected = _expected_bytes_per_step(out, len(metrics))
    for row, exp in zip(metrics, expected):
        by_kind = row["bytes_sent_by_kind"]
        assert row["samples"] == exp["samples"]
        # Only per-sample lengths describe the mask: 8 bytes per sample, no [T, T] or [B, T] mask.
        assert by_kind["lengths"] == 8 * row["samples"]
        for k in ("activation", "gradient", "lengths", "control", "header"):
            assert by_kind[k] == exp[k], (row["step"], k, by_kind, exp)
        assert by_kind["gradient"] == by_kind["activation"]
        assert row["bytes_sent"] == sum(by_kind.values())


def test_noise_does_not_change_what_is_sent(runs):
    """Same data, same clients: noise 0 and the default noise send byte-identical traffic per step.
    (The two runs also differ in lr and LoRA vs full fine-tuning, none of which may change the
    bytes either.)"""
    noisy, clean = load_metrics(runs.default()), load_metrics(runs.parallel(3, 1, 2))
    assert len(clean) == 20
    for a, b in zip(noisy, clean):
        assert a["bytes_sent_by_kind"] == b["bytes_sent_by_kind"], a["step"]


# ------------------------------------------------------------------ sequential mode


def test_sequential_mode_trains_with_the_same_traffic(runs):
    seq = runs.get("seq-c2s2z3", [*EXACT, "train.mode=sequential", "topology.clients=2", "topology.servers=2",
                                  "deepspeed.zero_stage=3"], 4)
    par = runs.parallel(2, 2, 3)
    s = load_summary(seq)
    assert s["mode"] == "sequential" and s["steps"] == 20
    assert sum(s["losses"][-5:]) / 5 < s["losses"][0] - 0.1, s["losses"]
    sm, pm = load_metrics(seq), load_metrics(par)
    for a, b in zip(sm, pm):
        ka, kb = a["bytes_sent_by_kind"], b["bytes_sent_by_kind"]
        for k in ("activation", "gradient", "lengths"):
            assert ka[k] == kb[k], (a["step"], k)
        # Only the turn-taking signal is extra: tiny next to the hidden states.
        assert a["bytes_sent"] <= b["bytes_sent"] * 1.01
    assert sorted(os.listdir(seq / "adapters")) == ["client0", "client1", "partition.json", "server"]


# ------------------------------------------------------------------ heterogeneous split points


def test_per_client_split_points(runs):
    # ZeRO-3: each server runs a block only on its rows, and the two servers hold different client
    # mixes (server 0: clients 0 and 2, block 4 for client 0's rows only; server 1: client 1 alone,
    # a dummy row for block 1), yet must call their modules in the same order or DeepSpeed's
    # parameter trace disagrees.
    out = runs.get("hetero", ["topology.clients=3", "topology.servers=2", "split.per_client=[[1,1],[2,1],[1,2]]",
                              "federated.avg_every=2", "train.steps=10", "deepspeed.zero_stage=3",
                              # EMULATION rides along: client 1 2x slower, client 2 on a 2 ms link
                              "emulate.client_slowdown=[1, 2, 1]", "emulate.link_latency_ms=[0, 0, 2]"], 5)
    s = load_summary(out)
    assert s["steps"] == 10 and all(l == l for l in s["losses"])
    assert s["emulated"] == {"client_slowdown": [1, 2, 1], "link_latency_ms": [0, 0, 2]}
    # The start-up probe sees the emulated link (a sleep is never shorter than asked).
    assert s["wire_probe"]["latency_s"][2] >= 0.002
    for row in load_metrics(out):  # 5 messages a step cross client 2's link; client 1 sleeps
        assert row["phase_s"]["emulated_link_s"] == pytest.approx(5 * 0.002)
        assert row["phase_s"]["emulated_compute_s"] > 0
        if row["step"] >= 2:  # the cost model: every client measured from step 2 (step 1 is warm-up)
            costs = row["costs"]
            assert all(len(costs[k]) == 3 and min(costs[k]) > 0 for k in ("client_block_s", "server_block_s"))
            assert costs["wire_s"][2] >= 5 * 0.002
    own = {0: {0, 5}, 1: {0, 1, 5}, 2: {0, 4, 5}}
    tensors = {}
    for c, layers in own.items():
        d = out / "adapters" / f"client{c}"
        assert adapter_layers(d) == layers, c
        tensors[c] = adapter_tensors(d)
        assert len(tensors[c]) == len(layers) * 4 * 2  # q,k,v,o x lora_A/B
    assert adapter_layers(out / "adapters" / "server") == {1, 2, 3, 4}
    # Step 10 ends with a FedAvg: blocks every client holds are identical across clients.
    shared = [k for k in tensors[0] if ".layers.0." in k or ".layers.5." in k]
    assert shared
    for k in shared:
        torch.testing.assert_close(tensors[1][k], tensors[0][k], atol=1e-6, rtol=1e-6, msg=k)
        torch.testing.assert_close(tensors[2][k], tensors[0][k], atol=1e-6, rtol=1e-6, msg=k)


# ------------------------------------------------------------------ live repartitioning

SCHEDULE = "debug.partition_schedule=[[7,2,1],[14,1,1]]"  # every client: p 1 -> 2 before step 7, back before 14


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_moving_blocks_live_keeps_centralized_losses(runs, zero):
    """The invariant that proves migration: block 1 goes from the server (ZeRO-sharded) to both
    clients and back, with its LoRA adapter and AdamW moments; the losses stay the centralized
    ones. A block left behind, a moment dropped or a shard not gathered breaks it by ~1e-3."""
    ref = load_summary(runs.centralized(2))["losses"]
    out = runs.get(f"moved-z{zero}", [*EXACT, "topology.clients=2", "topology.servers=2",
                                      f"deepspeed.zero_stage={zero}", SCHEDULE], 4)
    s = load_summary(out)
    assert len(s["losses"]) == STEPS >= 20
    diffs = [abs(a - b) for a, b in zip(s["losses"], ref)]
    assert max(diffs) < 1e-4, f"per-step |moved - centralized| = {diffs}"
    assert [(r["step"], r["old"], r["new"]) for r in s["rebalances"]] == [
        (7, [[1, 1], [1, 1]], [[2, 1], [2, 1]]), (14, [[2, 1], [2, 1]], [[1, 1], [1, 1]])]
    assert all(r["migrate_s"] > 0 and r["reason"] == "debug.partition_schedule" for r in s["rebalances"])
    assert s["final_partition"] == [[1, 1], [1, 1]]
    rows = load_metrics(out)
    assert [i for i, r in enumerate(rows) if "rebalance" in r] == [7, 14]  # logged with the first step moved
    assert rows[12]["rebalance_measured"]["step"] == 7  # then measured over 5 steps on the new partition
    assert adapter_layers(out / "adapters" / "server") == {1, 2, 3, 4}


def test_balanced_placement_moves_clients_between_servers_without_changing_the_maths(runs):
    """topology.assignment=balanced: client 1 starts with more server work (it keeps 2 blocks,
    client 0 keeps 3), so it gets server 0 and client 0 server 1; when the forced move evens the
    split at step 4 the clients swap servers live (links only: Part B is the same on both). The
    losses are those of the same run under round-robin, which never moves a client."""
    common = ["privacy.noise_std=0", "federated.avg_every=1", "train.steps=8", "topology.clients=2",
              "topology.servers=2", "deepspeed.zero_stage=3", "split.per_client=[[2,1],[1,1]]",
              "debug.partition_schedule=[[4,2,1]]"]
    rr = load_summary(runs.get("placed-rr", common, 4))
    bal = load_summary(runs.get("placed-balanced", [*common, "topology.assignment=balanced"], 4))
    diffs = [abs(a - b) for a, b in zip(bal["losses"], rr["losses"])]
    assert len(diffs) == 8 and max(diffs) < 1e-6, diffs
    (rec,) = bal["rebalances"]
    assert (rec["step"], rec["old_assignment"], rec["new_assignment"]) == (4, [1, 0], [0, 1])
    assert bal["final_assignment"] == [0, 1] and "final_assignment" not in rr
    assert rr["final_partition"] == bal["final_partition"] == [[2, 1], [2, 1]]


def _saved_layers(d: Path) -> set[int]:
    f = d / "adapter_model.safetensors"
    f = f if f.is_file() else d / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        return {int(k.split(".")[k.split(".").index("layers") + 1]) for k in h.keys() if ".layers." in k}


def test_moves_in_sequential_full_finetuning_save_the_final_partition(runs):
    """Base weights (peft.lora_r=0) move too, under ZeRO-3, in sequential mode with FedAvg every 2
    steps and noise on; what is saved at the end is the final partition, each block once per holder."""
    out = runs.get("moved-seq-full", ["train.mode=sequential", "peft.lora_r=0", "federated.avg_every=2",
                                      "train.steps=8", "deepspeed.zero_stage=3", "topology.clients=2",
                                      "topology.servers=1", "debug.partition_schedule=[[3,2,1],[6,1,2]]"], 3)
    s = load_summary(out)
    assert s["steps"] == 8 and all(math.isfinite(v) for v in s["losses"])
    assert s["final_partition"] == [[1, 2], [1, 2]] and len(s["rebalances"]) == 2
    for c in range(2):
        assert _saved_layers(out / "adapters" / f"client{c}") == {0, 4, 5}
    assert _saved_layers(out / "adapters" / "server") == {1, 2, 3}


def test_rebalance_once_gives_the_slow_client_fewer_blocks(runs):
    """split.rebalance=once from measured costs: client 1 is EMULATED 4x slower, so the planner
    (lockstep: the slowest client bounds the step) takes blocks off it; the move is logged."""
    out = runs.get("rebalance-once", ["train.steps=10", "topology.clients=2", "topology.servers=1",
                                      "split.per_client=[[2,2],[2,2]]", "emulate.client_slowdown=[1,4]",
                                      "split.rebalance=once", "split.rebalance_warmup_steps=4"], 3)
    s = load_summary(out)
    (rec,) = s["rebalances"]
    assert rec["step"] == 4 and rec["reason"] == "planned" and rec["old"] == [[2, 2], [2, 2]]
    assert sum(s["final_partition"][1]) < 4 and rec["new"] == s["final_partition"]
    assert rec["predicted_old_s"] / rec["predicted_new_s"] > 1.25  # split.rebalance_min_gain's default
    assert rec["plan_s"] >= 0 and rec["measured_new_s"] > 0
    assert "rebalance" in load_metrics(out)[4]


# ------------------------------------------------------------------ outputs


def test_config_yaml_round_trips(runs):
    from fedsea_hpc.config import load_config

    out = runs.default()
    text = (out / "config.yaml").read_text()
    written = yaml.safe_load(text)
    again = load_config(str(out / "config.yaml")).to_dict()
    assert again == written
    assert written["train"]["steps"] == DEFAULT_STEPS and written["run"]["output_dir"] == str(out)
    assert written["data"]["train_files"], "the resolved (shipped) data files are recorded"
    # Every other value of the config file is what the run used.
    shipped = yaml.safe_load((REPO / DEFAULT_CONFIG).read_text())
    for section, values in shipped.items():
        for key, v in values.items():
            if (section, key) not in (("train", "steps"), ("run", "output_dir")):
                assert written[section][key] == v, f"{section}.{key}"


def test_metrics_jsonl_has_one_row_per_step(runs):
    out = runs.default()
    rows = load_metrics(out)
    shipped = yaml.safe_load((REPO / DEFAULT_CONFIG).read_text())
    per_step = shipped["topology"]["clients"] * shipped["train"]["micro_batch_size"]
    assert [r["step"] for r in rows] == list(range(1, DEFAULT_STEPS + 1))
    for r in rows:
        assert METRIC_KEYS <= set(r), set(r)
        assert r["tokens"] > 0 and 0 < r["samples"] <= per_step and r["step_time_s"] > 0  # an epoch may end in a partial batch
    assert max(r["samples"] for r in rows) == per_step
    s = load_summary(out)
    assert s["losses"] == [r["loss"] for r in rows]
    assert s["bytes_sent_total"] == sum(r["bytes_sent"] for r in rows)
    assert s["bytes_sent_by_kind"] == {k: sum(r["bytes_sent_by_kind"][k] for r in rows)
                                       for k in rows[0]["bytes_sent_by_kind"]}


def test_adapters_are_peft_and_load_onto_the_hf_model(runs, tmp_path):
    from peft import PeftModel

    from fedsea_hpc.config import load_config
    from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE
    from fedsea_hpc.model.loading import resolve_model

    out = runs.parallel(2, 2, 0)  # LoRA (the default job, configs/default.yaml, fine-tunes fully)
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.peft.lora_r > 0
    root = out / "adapters"
    assert sorted(os.listdir(root)) == ["client0", "client1", "partition.json", "server"]
    for d in ("client0", "client1", "server"):
        conf = json.loads((root / d / "adapter_config.json").read_text())
        assert conf["peft_type"] == "LORA"
        assert conf["r"] == cfg.peft.lora_r and conf["lora_alpha"] == cfg.peft.lora_alpha
        assert set(conf["target_modules"]) == set(cfg.peft.target_modules)
    assert adapter_layers(root / "client0") == {0, 5} and adapter_layers(root / "server") == {1, 2, 3, 4}

    # Client 0's Part A/C adapter + the server's Part B adapter = one adapter for the whole model.
    merged = {**adapter_tensors(root / "client0"), **adapter_tensors(root / "server")}
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    save_file(merged, str(full_dir / "adapter_model.safetensors"))
    (full_dir / "adapter_config.json").write_text((root / "server" / "adapter_config.json").read_text())
    source = resolve_model("tiny", tiny_vocab_size=TINY_VOCAB_SIZE, seed=cfg.run.seed)
    model = PeftModel.from_pretrained(source.build_model(), str(full_dir))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(merged) == L * 4 * 2
    for k, v in merged.items():
        key = k.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key], v), k
    assert any(v.abs().sum() > 0 for k, v in merged.items() if "lora_B" in k), "adapters were trained"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, TINY_VOCAB_SIZE) and torch.isfinite(logits).all()
