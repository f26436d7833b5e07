"""The configuration's shape: one typed dataclass per section, each field with its default and help.

Every field carries its help text in ``metadata["help"]``; ``fedsea config-reference`` renders
them, so README's reference is generated from this file and cannot drift from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from fedsea_hpc.errors import InputError


class ConfigError(InputError):
    """A one-line, user-facing configuration error (exit code 2)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: yaml.safe_load(yaml.safe_dump(d)),
                     metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# train.mode values that run in one process, without a split (no server, no wire).
ONE_PROCESS_MODES = ("centralized", "local")

# The paper reports its default noise (0.02) as the mean absolute value of the Gaussian noise;
# E|ε| = σ·sqrt(2/π), so the matching standard deviation is 0.02·sqrt(π/2) ≈ 0.02507.
PAPER_NOISE_SIGMA = 0.02 * math.sqrt(math.pi / 2)
# The default: relative noise of 0.25 x each token's RMS (benchmarks/results/privacy*.json).
DEFAULT_RELATIVE_NOISE = 0.25


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str = _f("runs/default", "Directory for config.yaml, metrics.jsonl, summary.json and adapters.")
    seed: int = _f(0, "Seed for model init, LoRA init and data order (not the privacy noise: see privacy.noise_seed).")
    log_every: int = _f(1, "Print a progress line every this many steps (metrics.jsonl gets every step).")
    progress: bool = _f(True, "Show a progress bar on rank 0.")
    save_every: int = _f(0, "Write a checkpoint under run.output_dir/checkpoints/ every this many steps (0 = off); "
                            "README, Checkpoints.")
    trace: bool = _f(False, "train: write run.output_dir/trace.json, a Chrome-trace/Perfetto timeline of every rank's "
                            "steps (compute per part, each send/receive with bytes and peer, waits, collectives); "
                            "README, Traces.")
    keep_checkpoints: int = _f(2, "Keep the last this many complete checkpoints (>= 1); older ones are deleted "
                                  "once a newer one is complete.")
    max_restarts: int = _f(0, "launch/local.sh and slurm/*.sbatch: restart a failed training job this many times, "
                              "each from the last checkpoint (run.resume=auto; run.save_every sets how much is "
                              "redone). Not on bad input (exit 2) or a stop by signal (exit 75).")
    overwrite: bool = _f(False, "A run into a run.output_dir that holds an earlier run of the same job moves that "
                                "run aside (train: to DIR.1, DIR.2, ...; generate/eval: their own files to DIR/eval.1/ "
                                "...) and says so; true deletes its outputs instead (README, Outputs).")
    resume: str = _f("off", "Continue a run from a checkpoint: off; auto (the latest complete one under "
                            "run.output_dir/checkpoints, or start fresh); or the path of a checkpoint directory.")
    resume_clients: list = _f([], "Resume with other clients: client i of this run continues the checkpoint's "
                                  "client resume_clients[i] (its part, optimizer, data silo); clients not listed "
                                  "left and their state is dropped. [] = the same clients.")


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = _f("tiny", "'tiny' (random Llama built from model.tiny_*), a local HF Llama dir, a .gguf file or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = _f("float32", "Parameter and activation dtype (float64 is for exactness checks).")
    attn_implementation: Literal["sdpa", "eager"] = _f("sdpa", "transformers attention kernel, the same on every rank.")
    cache_dir: str = _f("", "Where converted checkpoints (GGUF → safetensors) are cached; '' = ~/.cache/fedsea.")
    tiny_hidden_size: int = _f(64, "Hidden size of the 'tiny' model.")
    tiny_layers: int = _f(6, "Number of decoder blocks of the 'tiny' model.")
    tiny_heads: int = _f(4, "Attention heads of the 'tiny' model.")
    tiny_kv_heads: int = _f(2, "Key/value heads of the 'tiny' model (GQA when < tiny_heads).")
    tiny_intermediate_size: int = _f(128, "MLP width of the 'tiny' model.")


@dataclass(kw_only=True)
class TopologyConfig:
    clients: int = _f(2, "Number of client ranks (data silos); they are global ranks 0..clients-1.")
    servers: int = _f(1, "Number of server ranks (DeepSpeed group); global ranks clients..clients+servers-1.")
    assignment: Literal["round_robin", "balanced"] = _f(
        "round_robin", "Which server rank serves which client: round_robin (client c on server c % servers) or "
                       "balanced (longest server work first onto the least loaded server rank, work = rows x "
                       "server blocks; re-planned with the split points by split.rebalance). Only "
                       "train.mode=parallel with servers >= 2 differs.")
    client_device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", "Where client ranks compute: auto (a GPU under NCCL, else the CPU), cpu, cuda. CPU clients with GPU "
                "servers is FedSEA's deployment: hidden states then travel through host memory (gloo). README, "
                "Devices per role.")
    server_device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", "Where server ranks compute (auto, cpu, cuda); GPU servers in a gloo job share an NCCL group for "
                "DeepSpeed. README, Devices per role.")


@dataclass(kw_only=True)
class SplitConfig:
    head_layers: int = _f(1, "p: blocks [0, p) run on the client before the server (Part A).")
    tail_layers: int = _f(1, "q: blocks [L-q, L) plus norm and head run on the client after the server (Part C).")
    per_client: list = _f([], "Optional per-client overrides, one [p, q] pair per client rank, e.g. [[1, 1], [2, 1]].")
    min_head_layers: int = _f(1, "Privacy floor: smallest p (blocks in Part A) any client may use, checked at start and "
                                 "kept by the planner: the fewer blocks before the cut, the closer h_A is to the token "
                                 "embeddings (see the README's measured attack).")
    min_tail_layers: int = _f(1, "Floor on q (blocks in Part C, before the head that sees the labels), checked at start "
                                 "and kept by the planner.")
    client_memory_mb: list = _f([], "Optional memory budget per client in MiB (a number > 0, or null = none), one per "
                                    "client: the initial split and every plan must fit (weights, adapters, optimizer "
                                    "state, measured activations; README, Rebalancing). [] = no budgets.")
    rebalance: Literal["off", "once", "every"] = _f(
        "off", "Move split points at run time from measured costs (README, Rebalancing): off; once (after "
               "split.rebalance_warmup_steps); every (re-plan every split.rebalance_every steps). Blocks move with "
               "their adapters and optimizer state, without a restart.")
    rebalance_warmup_steps: int = _f(5, "Steps measured before the first plan (split.rebalance once/every); >= 2.")
    rebalance_every: int = _f(20, "split.rebalance=every: re-plan every this many steps; >= 1.")
    rebalance_min_gain: float = _f(1.25, "Move only when the plan predicts a step-time speed-up above this factor "
                                         "(>= 1), so the partition does not flap.")


@dataclass(kw_only=True)
class PeftConfig:
    lora_r: int = _f(8, "LoRA rank; 0 means full fine-tuning of every part.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Linear layers that get LoRA adapters.")


@dataclass(kw_only=True)
class PrivacyConfig:
    noise_std: float = _f(DEFAULT_RELATIVE_NOISE,
                          "Gaussian noise a client adds to the hidden states it sends: with noise_mode=relative "
                          "(default) the noise-to-signal ratio per token, with absolute the σ itself. Default 0.25 "
                          "x RMS, chosen from the measured attack (README, Privacy). The paper's own default, "
                          "mean abs noise 0.02, is noise_mode=absolute noise_std=0.02507 (σ = 0.02·sqrt(π/2)). "
                          "0 disables.")
    noise_mode: Literal["absolute", "relative"] = _f(
        "relative", "relative: per token, σ = noise_std × the RMS of that token's hidden vector (the same setting "
                    "means the same across models and split points); absolute: ε ~ N(0, noise_std²) on every element.")
    noise_seed: int = _f(-1, "TEST ONLY. -1 (default): each client seeds its noise from OS entropy on its own rank, "
                             "so no other rank can regenerate it. >= 0: a reproducible seed every rank can compute "
                             "(summary.json then marks the run noise_seed_test_only).")
    grad_clip: float = _f(0.0, "Per-sample L2 clip of the gradient a client returns to the server; 0 = off.")
    grad_noise_std: float = _f(0.0, "σ of Gaussian noise added to that returned gradient; 0 = off.")
    noise_in_eval: bool = _f(False, "Add the activation noise (privacy.noise_std) to the hidden states a client sends "
                                    "during evaluation too. Off by default, as in the paper: eval loss then measures "
                                    "the model, not the noise.")


@dataclass(kw_only=True)
class TrainConfig:
    mode: Literal["parallel", "sequential", "centralized", "local"] = _f(
        "parallel", "parallel: all clients at once (client-batch); sequential: one client at a time; "
        "centralized: one process, the unsplit model on the union of the clients' batches; local: one process, "
        "each client's own full copy of the model trained on its own data only (the silo-alone baseline).")
    steps: int = _f(60, "Optimizer steps.")
    micro_batch_size: int = _f(8, "Sequences per client per step.")
    seq_len: int = _f(128, "Sequences are truncated to this many tokens (the cut is counted).")
    lr: float = _f(3e-3, "AdamW learning rate, same on every part.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    eval_every: int = _f(0, "Evaluate on every client's held-out set (data.eval_files or data.eval_fraction) every "
                            "this many steps and after the last one; 0 = only after the last. Forward only: no "
                            "optimizer step, no noise unless privacy.noise_in_eval. No effect without an eval set.")


@dataclass(kw_only=True)
class FederatedConfig:
    avg_every: int = _f(1, "Average client-side trainable parameters over the clients every this many steps, "
                           "weighted by samples. 1 averages gradients every step (FedSGD), which equals "
                           "centralized training; 0 never averages.")
    secure_aggregation: Literal["auto", True, False] = _f(
        "auto", "Sum client updates (FedSGD gradients, FedAvg parameters) under pairwise additive masks from X25519 "
                "keys, so no client sees another's individual update, only the sum; exact in fixed point. auto = on "
                "from 3 clients up (with 2, the sum minus one's own update is the other's: masks cannot hide it).")


@dataclass(kw_only=True)
class DataConfig:
    train_files: list = _f([], "JSONL files: one per client, or one sharded round-robin over clients. "
                               "[] = the small corpus shipped with the package.")
    eval_files: list = _f([], "Held-out JSONL files, same formats and rules as data.train_files (one per client, or "
                              "one sharded round-robin); each client evaluates on its own share, which never leaves "
                              "it. [] = use data.eval_fraction.")
    eval_fraction: float = _f(0.0, "With no data.eval_files: hold out this fraction (0, 0.5] of each client's "
                                   "training records as its eval set, never trained on (the same records for a "
                                   "given run.seed and data). 0 = no eval set.")


# deepspeed.extra: keys that tune DeepSpeed without changing what the server computes, and the
# keys that would break the split-training contract, each with the reason given to the user.
DEEPSPEED_EXTRA_ALLOWED = ("zero_optimization", "wall_clock_breakdown", "steps_per_print", "memory_breakdown",
                           "flops_profiler", "comms_logger", "zero_allow_untested_optimizer")
_DEEPSPEED_EXTRA_REFUSED = {
    "gradient_clipping": "clipping only the server's share of the gradient changes the optimisation problem",
    "gradient_accumulation_steps": "the server steps once per round, in lockstep with the clients",
    "train_batch_size": "the server steps once per round, in lockstep with the clients",
    "train_micro_batch_size_per_gpu": "the server steps once per round, in lockstep with the clients",
    "fp16": "the precision follows model.dtype", "bf16": "the precision follows model.dtype",
    "amp": "the precision follows model.dtype",
    "communication_data_type": "the gradient reduction precision follows model.dtype",
    "optimizer": "every part uses AdamW with train.lr and train.weight_decay",
    "scheduler": "every part uses AdamW with train.lr and train.weight_decay",
}


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage 0-3 for the server group's Part B.")
    extra: dict = _f({}, "Extra keys merged into the DeepSpeed config dict (advanced); only keys that keep the split "
                         "contract are accepted: " + ", ".join(sorted(DEEPSPEED_EXTRA_ALLOWED)) + " (zero_optimization "
                         "without its stage).")


@dataclass(kw_only=True)
class CommConfig:
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "torch.distributed backend; auto = nccl with GPUs, else gloo.")
    timeout_s: float = _f(60.0, "Time to detect a dead peer: a rank whose heartbeat (through the rendezvous store) "
                                "has stopped this long is declared lost and the job exits non-zero. A long wait on "
                                "a live peer is not an error (README, Fault tolerance).")
    max_wait_s: float = _f(0.0, "Longest single wait on a live peer (a receive, a collective) before the job gives "
                                "up; 0 = no limit. The net for a peer that is alive but never sends.")
    max_message_mb: float = _f(1024.0, "Largest payload a receiver accepts before allocating.")
    startup_timeout_s: float = _f(900.0, "How long ranks wait for each other to load their parts and set up "
                                         "DeepSpeed before the first step (big checkpoints load slowly).")


@dataclass(kw_only=True)
class DebugConfig:
    fail_rank: int = _f(-1, "Fault injection for tests: this rank exits abruptly ...")
    fail_step: int = _f(-1, "... at the start of this step (-1 = never; 0-based); only in the first attempt of a "
                            "launcher that restarts (FEDSEA_ATTEMPT=0).")
    fail_save: int = _f(-1, "... or while writing the checkpoint after this many steps: after its own files, before "
                            "the COMPLETE marker (-1 = never; first attempt only).")
    stall_rank: int = _f(-1, "Slow-peer emulation for tests: this rank sleeps debug.stall_s seconds (alive, its "
                             "heartbeat beating) ...")
    stall_step: int = _f(-1, "... at the start of this step (-1 = never; 0-based).")
    stall_s: float = _f(0.0, "... for this many seconds (EMULATED slowness: no compute happens).")
    slow_save_s: float = _f(0.0, "Slow-filesystem emulation for tests: every rank's background checkpoint writer "
                                 "sleeps this long before each checkpoint's files (EMULATED: training goes on "
                                 "meanwhile); 0 = off.")
    dump_aggregation_steps: int = _f(0, "Under secure aggregation, each client saves its raw and masked integer "
                                        "update and the sum for the first this many aggregations under "
                                        "run.output_dir/secagg/ (audits and tests); 0 = off.")
    dump_wire_steps: int = _f(0, "Server ranks save every tensor received during the first this many steps under "
                                 "run.output_dir/wire/ (to audit what leaves a client); 0 = off.")
    partition_schedule: list = _f([], "Forced repartitions for tests: [[step, p, q], ...] moves every client to (p, q) "
                                      "before that step (steps ascending, >= 1), through the same live migration as "
                                      "split.rebalance (which it overrides). [] = off.")


@dataclass(kw_only=True)
class EmulateConfig:
    client_slowdown: list = _f([], "EMULATION, not measurement: one factor >= 1 per client; each compute phase of that "
                                   "client is stretched by sleeping (factor - 1) x its measured time. [] = off.")
    link_mbps: list = _f([], "EMULATION: one link rate per client in Mbit/s (> 0, or 0 = no limit); every message to or "
                             "from that client is delayed by bytes x 8 / rate. [] = off.")
    link_latency_ms: list = _f([], "EMULATION: one one-way latency per client in ms (>= 0), added to every message "
                                   "to or from that client. [] = off.")


@dataclass(kw_only=True)
class GenerateConfig:
    prompts_files: list = _f([], "`fedsea generate`: JSONL prompt files, one per client or one sharded round-robin over "
                                 "clients; records {\"prompt\": str} or {\"messages\": [...]}.")
    chat_template: Literal["auto", True, False] = _f("auto", "Apply the tokenizer's chat template (with the generation "
                                                             "prompt): auto = for 'messages' records only.")
    max_new_tokens: int = _f(32, "Most tokens generated per prompt.")
    batch_size: int = _f(8, "Prompts per client batch (left-padded).")
    temperature: float = _f(0.0, "Sampling temperature; 0 = greedy.")
    top_k: int = _f(0, "Sample from the k most likely tokens only; 0 = off.")
    top_p: float = _f(1.0, "Nucleus sampling mass; 1.0 = off.")
    seed: int = _f(0, "Seed of the sampling generator (per client: seed + client index).")
    stop: list = _f([], "Stop strings: a sequence ends once its completion contains one (the completion is cut before it).")
    kv_cache: bool = _f(True, "Keep a KV cache on each side and send one hidden vector per step; false re-sends and "
                              "recomputes the whole sequence every step (baseline, same outputs).")
    noise: bool = _f(False, "Add privacy.noise_std Gaussian noise to the hidden states clients send while generating.")
    adapters_dir: str = _f("", "A training run's adapters/ dir (client<i>/ onto Parts A+C, server/ onto Part B); '' = none.")


@dataclass(kw_only=True)
class EvalConfig:
    adapters_dir: str = _f("", "`fedsea eval`: a training run's adapters/ dir (client<i>/ onto Parts A+C, server/ onto "
                               "Part B); '' = the base model. The eval sets are data.eval_files / data.eval_fraction.")
    generate: bool = _f(True, "`fedsea eval`: also generate an answer for each {prompt, response} or chat record "
                              "(greedy unless generate.temperature; generate.max_new_tokens, stop, batch_size) and "
                              "score it against the reference: exact match and ROUGE-L F1 (README, Evaluation).")
    max_records: int = _f(0, "`fedsea eval`: generate for at most this many records per client (the first ones); "
                             "0 = all. The loss always covers the whole eval set.")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def split_for(self, client: int) -> tuple[int, int]:
        """(p, q) of one client rank."""
        if self.split.per_client:
            p, q = self.split.per_client[client]
            return int(p), int(q)
        return self.split.head_layers, self.split.tail_layers

    def splits(self) -> list[tuple[int, int]]:
        """(p, q) of every client rank, in client order."""
        return [self.split_for(c) for c in range(self.topology.clients)]

    def secure_aggregation(self) -> bool:
        """Whether client sums are masked (``federated.secure_aggregation``, auto = 3+ clients)."""
        sa = self.federated.secure_aggregation
        return sa is True or (sa == "auto" and self.topology.clients >= 3)

    def world_size(self) -> int:
        return 1 if self.train.mode in ONE_PROCESS_MODES else self.topology.clients + self.topology.servers
