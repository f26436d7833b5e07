"""Typed configuration: YAML file + ``key=value`` overrides, validated once.

Every field carries its help text in ``metadata["help"]``; ``fedsea config-reference`` renders
them, so README's reference is generated from this file and cannot drift from it.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A one-line, user-facing configuration error (exit code 2)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: yaml.safe_load(yaml.safe_dump(d)),
                     metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


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


@dataclass(kw_only=True)
class SplitConfig:
    head_layers: int = _f(1, "p: blocks [0, p) run on the client before the server (Part A).")
    tail_layers: int = _f(1, "q: blocks [L-q, L) plus norm and head run on the client after the server (Part C).")
    per_client: list = _f([], "Optional per-client overrides, one [p, q] pair per client rank, e.g. [[1, 1], [2, 1]].")


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
    min_head_layers: int = _f(1, "Smallest p (blocks in Part A) any client may use, checked at start: the fewer blocks "
                                 "before the cut, the closer h_A is to the token embeddings (see the README's measured "
                                 "attack). Any split the rebalancing work picks must respect it.")
    grad_clip: float = _f(0.0, "Per-sample L2 clip of the gradient a client returns to the server; 0 = off.")
    grad_noise_std: float = _f(0.0, "σ of Gaussian noise added to that returned gradient; 0 = off.")


@dataclass(kw_only=True)
class TrainConfig:
    mode: Literal["parallel", "sequential", "centralized"] = _f(
        "parallel", "parallel: all clients at once (client-batch); sequential: one client at a time; "
        "centralized: one process, the unsplit model on the union of the clients' batches.")
    steps: int = _f(60, "Optimizer steps.")
    micro_batch_size: int = _f(8, "Sequences per client per step.")
    seq_len: int = _f(128, "Sequences are truncated to this many tokens (the cut is counted).")
    lr: float = _f(3e-3, "AdamW learning rate, same on every part.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")


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


def _check_deepspeed_extra(extra: dict) -> None:
    for key, value in extra.items():
        if key in _DEEPSPEED_EXTRA_REFUSED:
            raise ConfigError(f"deepspeed.extra: key '{key}' is not allowed ({_DEEPSPEED_EXTRA_REFUSED[key]}); "
                              f"allowed: {', '.join(DEEPSPEED_EXTRA_ALLOWED)}")
        if key not in DEEPSPEED_EXTRA_ALLOWED:
            raise ConfigError(f"deepspeed.extra: unknown key '{key}'; allowed: {', '.join(DEEPSPEED_EXTRA_ALLOWED)}")
        if key == "zero_optimization":
            if not isinstance(value, dict):
                raise ConfigError(f"deepspeed.extra.zero_optimization: expected a mapping, got {value!r}")
            if "stage" in value:
                raise ConfigError("deepspeed.extra.zero_optimization.stage: set deepspeed.zero_stage instead")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage 0-3 for the server group's Part B.")
    extra: dict = _f({}, "Extra keys merged into the DeepSpeed config dict (advanced); only keys that keep the split "
                         "contract are accepted: " + ", ".join(sorted(DEEPSPEED_EXTRA_ALLOWED)) + " (zero_optimization "
                         "without its stage).")


@dataclass(kw_only=True)
class CommConfig:
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "torch.distributed backend; auto = nccl with GPUs, else gloo.")
    timeout_s: float = _f(60.0, "A rank waiting longer than this on a peer gives up and the job exits non-zero.")
    max_message_mb: float = _f(1024.0, "Largest payload a receiver accepts before allocating.")
    startup_timeout_s: float = _f(900.0, "How long ranks wait for each other to load their parts and set up "
                                         "DeepSpeed before the first step (big checkpoints load slowly).")


@dataclass(kw_only=True)
class DebugConfig:
    fail_rank: int = _f(-1, "Fault injection for tests: this rank exits abruptly ...")
    fail_step: int = _f(-1, "... at the start of this step (-1 = never).")
    dump_aggregation_steps: int = _f(0, "Under secure aggregation, each client saves its raw and masked integer "
                                        "update and the sum for the first this many aggregations under "
                                        "run.output_dir/secagg/ (audits and tests); 0 = off.")
    dump_wire_steps: int = _f(0, "Server ranks save every tensor received during the first this many steps under "
                                 "run.output_dir/wire/ (to audit what leaves a client); 0 = off.")


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
    generate: GenerateConfig = field(default_factory=GenerateConfig)

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
        return 1 if self.train.mode == "centralized" else self.topology.clients + self.topology.servers


# ---------------------------------------------------------------- parsing

def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
            for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is list:
        if isinstance(value, str):  # a single file/module given on the command line
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _apply(cfg: Config, tree: dict, source: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    for section, values in tree.items():
        if not hasattr(cfg, section):
            raise ConfigError(f"unknown config section '{section}' (allowed: {', '.join(_sections())})")
        obj = getattr(cfg, section)
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key '{section}.{key}' "
                                  f"(allowed in {section}: {', '.join(hints)})")
            setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.steps=5", "peft.target_modules=[q_proj]"]`` → nested dict (values parsed as YAML)."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        dotted, raw = pair.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {dotted!r} must look like section.key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        tree.setdefault(parts[0], {})[parts[1]] = value
    return tree


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← overrides, then :func:`validate`. Raises ConfigError."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {path!r}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML: {str(e).splitlines()[0]}") from None
        _apply(cfg, tree, path)
    _apply(cfg, parse_overrides(overrides or []), "overrides")
    validate(cfg)
    return cfg


def shipped_data_files() -> list[str]:
    root = resources.files("fedsea_hpc") / "data" / "tiny"
    return sorted(str(p) for p in Path(str(root)).glob("client*.jsonl"))


def validate(cfg: Config, num_layers: int | None = None) -> None:
    """Check ranges and cross-field rules; with ``num_layers`` also the split points."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    t, s = cfg.topology, cfg.split
    need(t.clients >= 1, f"topology.clients: must be >= 1, got {t.clients}")
    need(t.servers >= 1, f"topology.servers: must be >= 1, got {t.servers}")
    need(t.servers <= t.clients, f"topology.servers: must be <= topology.clients ({t.clients}), got {t.servers}")
    need(cfg.train.steps >= 1, f"train.steps: must be >= 1, got {cfg.train.steps}")
    need(cfg.train.micro_batch_size >= 1, f"train.micro_batch_size: must be >= 1, got {cfg.train.micro_batch_size}")
    need(cfg.train.seq_len >= 2, f"train.seq_len: must be >= 2, got {cfg.train.seq_len}")
    need(cfg.train.lr > 0, f"train.lr: must be > 0, got {cfg.train.lr}")
    need(cfg.peft.lora_r >= 0, f"peft.lora_r: must be >= 0 (0 = full fine-tuning), got {cfg.peft.lora_r}")
    need(all(isinstance(m, str) and m for m in cfg.peft.target_modules) and cfg.peft.target_modules != [],
         "peft.target_modules: must be a non-empty list of module names, e.g. [q_proj, v_proj]")
    for k in ("noise_std", "grad_clip", "grad_noise_std"):
        v = getattr(cfg.privacy, k)
        need(v >= 0, f"privacy.{k}: must be >= 0, got {v}")
    need(isinstance(cfg.privacy.min_head_layers, int) and cfg.privacy.min_head_layers >= 1,
         f"privacy.min_head_layers: must be an integer >= 1, got {cfg.privacy.min_head_layers}")
    need(cfg.privacy.noise_seed >= -1, f"privacy.noise_seed: must be -1 (OS entropy) or >= 0, got {cfg.privacy.noise_seed}")
    need(cfg.debug.dump_aggregation_steps >= 0,
         f"debug.dump_aggregation_steps: must be >= 0, got {cfg.debug.dump_aggregation_steps}")
    need(cfg.debug.dump_wire_steps >= 0, f"debug.dump_wire_steps: must be >= 0, got {cfg.debug.dump_wire_steps}")
    need(cfg.federated.avg_every >= 0, f"federated.avg_every: must be >= 0, got {cfg.federated.avg_every}")
    _check_deepspeed_extra(cfg.deepspeed.extra)
    need(cfg.deepspeed.zero_stage in (0, 1, 2, 3),
         f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} is not one of 0, 1, 2, 3")
    need(cfg.comm.timeout_s > 0, f"comm.timeout_s: must be > 0, got {cfg.comm.timeout_s}")
    need(cfg.comm.startup_timeout_s > 0, f"comm.startup_timeout_s: must be > 0, got {cfg.comm.startup_timeout_s}")
    need(cfg.comm.max_message_mb > 0, f"comm.max_message_mb: must be > 0, got {cfg.comm.max_message_mb}")
    need(cfg.run.log_every >= 1, f"run.log_every: must be >= 1, got {cfg.run.log_every}")
    g = cfg.generate
    need(g.max_new_tokens >= 1, f"generate.max_new_tokens: must be >= 1, got {g.max_new_tokens}")
    need(g.batch_size >= 1, f"generate.batch_size: must be >= 1, got {g.batch_size}")
    need(g.temperature >= 0, f"generate.temperature: must be >= 0 (0 = greedy), got {g.temperature}")
    need(g.top_k >= 0, f"generate.top_k: must be >= 0 (0 = off), got {g.top_k}")
    need(0 < g.top_p <= 1, f"generate.top_p: must be in (0, 1], got {g.top_p}")
    need(all(isinstance(x, str) and x for x in g.stop), f"generate.stop: must be a list of non-empty strings, got {g.stop}")
    for i, fpath in enumerate(g.prompts_files):
        need(isinstance(fpath, str) and Path(fpath).is_file(), f"generate.prompts_files[{i}]: no such file {fpath!r}")
    if g.prompts_files:
        n = len(g.prompts_files)
        need(n in (1, t.clients), f"generate.prompts_files: give 1 file (sharded) or {t.clients} (one per client), got {n}")
    m = cfg.model
    for k in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_kv_heads", "tiny_intermediate_size"):
        need(getattr(m, k) >= 1, f"model.{k}: must be >= 1, got {getattr(m, k)}")
    need(m.tiny_hidden_size % m.tiny_heads == 0, "model.tiny_hidden_size: must be divisible by model.tiny_heads")
    need(m.tiny_heads % m.tiny_kv_heads == 0, "model.tiny_kv_heads: must divide model.tiny_heads")
    if s.per_client:
        need(len(s.per_client) == t.clients and all(
            isinstance(pq, list) and len(pq) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pq)
            for pq in s.per_client),
            f"split.per_client: must hold one [p, q] integer pair per client ({t.clients}), got {s.per_client}")
    for c in range(t.clients):  # per_client is well-formed by now; p < 1 is the layer check's
        where = f"split.per_client[{c}]" if s.per_client else "split.head_layers"
        need(cfg.split_for(c)[0] < 1 or cfg.split_for(c)[0] >= cfg.privacy.min_head_layers,
             f"{where}: p={cfg.split_for(c)[0]} is below privacy.min_head_layers={cfg.privacy.min_head_layers}; "
             "use p >= privacy.min_head_layers or lower it")
    if num_layers is not None:
        for c in range(t.clients):
            p, q = cfg.split_for(c)
            where = f"split.per_client[{c}]" if s.per_client else "split.head_layers/tail_layers"
            need(p >= 1 and q >= 1 and p + q < num_layers,
                 f"{where}: need 1 <= p, 1 <= q, p + q < {num_layers} layers; got p={p}, q={q}")
    if not cfg.data.train_files:
        cfg.data.train_files = shipped_data_files()[: t.clients] if t.clients <= 3 else shipped_data_files()[:1]
    for i, fpath in enumerate(cfg.data.train_files):
        need(isinstance(fpath, str) and Path(fpath).is_file(), f"data.train_files[{i}]: no such file {fpath!r}")
    n = len(cfg.data.train_files)
    need(n in (1, t.clients), f"data.train_files: give 1 file (sharded) or {t.clients} (one per client), got {n}")


def validate_generate(cfg: Config) -> None:
    """Rules that hold only for `fedsea generate` (a training config need not name prompts)."""
    if not cfg.generate.prompts_files:
        raise ConfigError("generate.prompts_files: required for `fedsea generate` (JSONL files with "
                          "{\"prompt\": ...} or {\"messages\": [...]} records)")
    if cfg.generate.adapters_dir and not Path(cfg.generate.adapters_dir).is_dir():
        raise ConfigError(f"generate.adapters_dir: no such directory {cfg.generate.adapters_dir!r}")


def check_world_size(clients: int, servers: int, world_size: int) -> None:
    """The launcher must start exactly one rank per client and per server."""
    if clients + servers != world_size:
        raise ConfigError(f"topology.clients ({clients}) + topology.servers ({servers}) = {clients + servers} "
                          f"ranks, but the launcher started {world_size}; run with -n {clients + servers} "
                          f"or change topology.*")


def reference_markdown() -> str:
    """The config reference table for README (``fedsea config-reference``)."""
    cfg = Config()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for sec in dataclasses.fields(Config):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            rows.append(f"| `{sec.name}.{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {f.metadata['help']} |")
    return "\n".join(rows)
