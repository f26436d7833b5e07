"""Range and cross-field rules of a :class:`~fedsea_hpc.config.schema.Config`, checked once at start.

Every failure is a :class:`ConfigError` whose one line names the key and what is allowed.
"""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from fedsea_hpc.config.schema import _DEEPSPEED_EXTRA_REFUSED, DEEPSPEED_EXTRA_ALLOWED, Config, ConfigError
from fedsea_hpc.errors import one_line


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


def shipped_data_files() -> list[str]:
    root = resources.files("fedsea_hpc") / "data" / "tiny"
    return sorted(str(p) for p in Path(str(root)).glob("client*.jsonl"))


def _check_emulate(cfg, need) -> None:
    """emulate.*: empty, or one number per client within each key's range."""
    rules = {"client_slowdown": (lambda v: v >= 1, ">= 1"), "link_mbps": (lambda v: v >= 0, ">= 0 (0 = no limit)"),
             "link_latency_ms": (lambda v: v >= 0, ">= 0")}
    n = cfg.topology.clients
    for key, (ok, allowed) in rules.items():
        xs = getattr(cfg.emulate, key)
        if not xs:
            continue
        need(isinstance(xs, list) and len(xs) == n, f"emulate.{key}: must hold one number per client ({n}), got {xs}")
        need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v) for v in xs),
             f"emulate.{key}: every value must be a number {allowed}, got {xs}")


def _check_files(key: str, files, need) -> None:
    """Each entry a path string naming an existing file (not a directory)."""
    for i, fpath in enumerate(files):
        need(isinstance(fpath, str) and fpath != "", f"{key}[{i}]: expected a file path, got {fpath!r}; allowed: "
                                                     "a JSONL file path (a string)")
        try:
            is_dir, is_file = Path(fpath).is_dir(), Path(fpath).is_file()
        except OSError as e:  # a name too long for the file system, ...
            raise ConfigError(f"{key}[{i}]: {one_line(e)}; allowed: an existing JSONL file") from None
        need(not is_dir, f"{key}[{i}]: {fpath} is a directory; allowed: a JSONL file")
        need(is_file, f"{key}[{i}]: no such file {fpath!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_rebalance(cfg, need) -> None:
    """split.rebalance_* ranges and debug.partition_schedule's shape (its (p, q) need L: see validate)."""
    s = cfg.split
    need(_is_int(s.rebalance_warmup_steps) and s.rebalance_warmup_steps >= 2,
         f"split.rebalance_warmup_steps: must be an integer >= 2 (costs are measured from step 1), "
         f"got {s.rebalance_warmup_steps}")
    need(_is_int(s.rebalance_every) and s.rebalance_every >= 1,
         f"split.rebalance_every: must be an integer >= 1, got {s.rebalance_every}")
    need(isinstance(s.rebalance_min_gain, (int, float)) and not isinstance(s.rebalance_min_gain, bool)
         and math.isfinite(s.rebalance_min_gain) and s.rebalance_min_gain >= 1,
         f"split.rebalance_min_gain: must be a number >= 1, got {s.rebalance_min_gain}")
    mem = s.client_memory_mb
    n = cfg.topology.clients
    need(isinstance(mem, list) and (not mem or len(mem) == n) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)
        for v in mem), f"split.client_memory_mb: must be [] or one budget per client ({n}), each a number > 0 "
                       f"(MiB) or null, got {mem}")
    sched = cfg.debug.partition_schedule
    need(isinstance(sched, list) and all(isinstance(e, list) and len(e) == 3 and all(_is_int(v) for v in e)
                                         for e in sched),
         f"debug.partition_schedule: must be a list of [step, p, q] integer triples, got {sched}")
    steps = [e[0] for e in sched]
    need(all(1 <= t < cfg.train.steps for t in steps) and steps == sorted(set(steps)),
         f"debug.partition_schedule: steps must be strictly ascending, >= 1 and < train.steps "
         f"({cfg.train.steps}), got {steps}")


def validate(cfg: Config, num_layers: int | None = None) -> None:
    """Check ranges and cross-field rules; with ``num_layers`` also the split points."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    t, s = cfg.topology, cfg.split
    need(t.clients >= 1, f"topology.clients: must be >= 1, got {t.clients}")
    need(t.servers >= 1, f"topology.servers: must be >= 1, got {t.servers}")
    need(t.servers <= t.clients, f"topology.servers: must be <= topology.clients ({t.clients}), got {t.servers}")
    for key in ("client_device", "server_device"):
        need(not (cfg.comm.backend == "nccl" and getattr(t, key) == "cpu"),
             f"topology.{key}: cpu, but comm.backend is nccl, which moves only GPU tensors; "
             "allowed: comm.backend=gloo or auto with a CPU role")
    need(cfg.train.steps >= 1, f"train.steps: must be >= 1, got {cfg.train.steps}")
    need(cfg.train.micro_batch_size >= 1, f"train.micro_batch_size: must be >= 1, got {cfg.train.micro_batch_size}")
    need(cfg.train.seq_len >= 2, f"train.seq_len: must be >= 2, got {cfg.train.seq_len}")
    need(cfg.train.lr > 0, f"train.lr: must be > 0, got {cfg.train.lr}")
    need(math.isfinite(cfg.train.lr), f"train.lr: must be a finite number, got {cfg.train.lr}")
    need(cfg.peft.lora_r >= 0, f"peft.lora_r: must be >= 0 (0 = full fine-tuning), got {cfg.peft.lora_r}")
    need(all(isinstance(m, str) and m for m in cfg.peft.target_modules) and cfg.peft.target_modules != [],
         "peft.target_modules: must be a non-empty list of module names, e.g. [q_proj, v_proj]")
    for k in ("noise_std", "grad_clip", "grad_noise_std"):
        v = getattr(cfg.privacy, k)
        need(v >= 0, f"privacy.{k}: must be >= 0, got {v}")
    for key in ("min_head_layers", "min_tail_layers"):
        v = getattr(cfg.split, key)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"split.{key}: must be an integer >= 1, got {v}")
    _check_rebalance(cfg, need)
    need(cfg.privacy.noise_seed >= -1, f"privacy.noise_seed: must be -1 (OS entropy) or >= 0, got {cfg.privacy.noise_seed}")
    need(cfg.debug.dump_aggregation_steps >= 0,
         f"debug.dump_aggregation_steps: must be >= 0, got {cfg.debug.dump_aggregation_steps}")
    need(cfg.debug.slow_save_s >= 0, f"debug.slow_save_s: must be >= 0 (0 = off), got {cfg.debug.slow_save_s}")
    need(cfg.debug.dump_wire_steps >= 0, f"debug.dump_wire_steps: must be >= 0, got {cfg.debug.dump_wire_steps}")
    need(cfg.federated.avg_every >= 0, f"federated.avg_every: must be >= 0, got {cfg.federated.avg_every}")
    _check_deepspeed_extra(cfg.deepspeed.extra)
    need(cfg.deepspeed.zero_stage in (0, 1, 2, 3),
         f"deepspeed.zero_stage: {cfg.deepspeed.zero_stage} is not one of 0, 1, 2, 3")
    need(cfg.comm.timeout_s > 0, f"comm.timeout_s: must be > 0, got {cfg.comm.timeout_s}")
    need(cfg.comm.max_wait_s >= 0, f"comm.max_wait_s: must be >= 0 (0 = no limit), got {cfg.comm.max_wait_s}")
    need(cfg.comm.startup_timeout_s > 0, f"comm.startup_timeout_s: must be > 0, got {cfg.comm.startup_timeout_s}")
    need(cfg.comm.max_message_mb > 0, f"comm.max_message_mb: must be > 0, got {cfg.comm.max_message_mb}")
    need(cfg.run.log_every >= 1, f"run.log_every: must be >= 1, got {cfg.run.log_every}")
    need(_is_int(cfg.run.save_every) and cfg.run.save_every >= 0,
         f"run.save_every: must be an integer >= 0 (0 = no checkpoints), got {cfg.run.save_every}")
    need(_is_int(cfg.run.keep_checkpoints) and cfg.run.keep_checkpoints >= 1,
         f"run.keep_checkpoints: must be an integer >= 1, got {cfg.run.keep_checkpoints}")
    need(_is_int(cfg.run.max_restarts) and cfg.run.max_restarts >= 0,
         f"run.max_restarts: must be an integer >= 0, got {cfg.run.max_restarts}")
    need(isinstance(cfg.run.resume, str) and cfg.run.resume != "",
         f"run.resume: must be off, auto or a checkpoint directory, got {cfg.run.resume!r}")
    need(not cfg.run.resume_clients or cfg.run.resume != "off",
         "run.resume_clients: only with run.resume (auto or a checkpoint directory), got run.resume=off")
    g = cfg.generate
    need(g.max_new_tokens >= 1, f"generate.max_new_tokens: must be >= 1, got {g.max_new_tokens}")
    need(g.batch_size >= 1, f"generate.batch_size: must be >= 1, got {g.batch_size}")
    need(g.temperature >= 0, f"generate.temperature: must be >= 0 (0 = greedy), got {g.temperature}")
    need(g.top_k >= 0, f"generate.top_k: must be >= 0 (0 = off), got {g.top_k}")
    need(0 < g.top_p <= 1, f"generate.top_p: must be in (0, 1], got {g.top_p}")
    need(all(isinstance(x, str) and x for x in g.stop), f"generate.stop: must be a list of non-empty strings, got {g.stop}")
    _check_files("generate.prompts_files", g.prompts_files, need)
    if g.prompts_files:
        n = len(g.prompts_files)
        need(n in (1, t.clients), f"generate.prompts_files: give 1 file (sharded) or {t.clients} (one per client), got {n}")
    _check_emulate(cfg, need)
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
        p, q = cfg.split_for(c)
        need(p < 1 or p >= s.min_head_layers,
             f"{where}: p={p} is below split.min_head_layers={s.min_head_layers}; use p >= split.min_head_layers or lower it")
        where_q = f"split.per_client[{c}]" if s.per_client else "split.tail_layers"
        need(q < 1 or q >= s.min_tail_layers,
             f"{where_q}: q={q} is below split.min_tail_layers={s.min_tail_layers}; use q >= split.min_tail_layers or lower it")
    if num_layers is not None:
        for i, (_, p, q) in enumerate(cfg.debug.partition_schedule):
            need(p >= s.min_head_layers and q >= s.min_tail_layers and p + q < num_layers,
                 f"debug.partition_schedule[{i}]: need p >= split.min_head_layers ({s.min_head_layers}), "
                 f"q >= split.min_tail_layers ({s.min_tail_layers}), p + q < {num_layers} layers; got p={p}, q={q}")
        floors = s.min_head_layers + s.min_tail_layers
        need(floors < num_layers, f"split.min_head_layers + split.min_tail_layers: {floors} leaves no block for the "
                                  f"server; must be < {num_layers} (the model's layers)")
        for c in range(t.clients):
            p, q = cfg.split_for(c)
            where = f"split.per_client[{c}]" if s.per_client else "split.head_layers/tail_layers"
            need(p >= 1 and q >= 1 and p + q < num_layers,
                 f"{where}: need 1 <= p, 1 <= q, p + q < {num_layers} layers; got p={p}, q={q}")
    if not cfg.data.train_files:
        cfg.data.train_files = shipped_data_files()[: t.clients] if t.clients <= 3 else shipped_data_files()[:1]
    _check_files("data.train_files", cfg.data.train_files, need)
    n = len(cfg.data.train_files)
    need(n in (1, t.clients), f"data.train_files: give 1 file (sharded) or {t.clients} (one per client), got {n}")
    d = cfg.data
    need(d.eval_fraction == 0 or 0 < d.eval_fraction <= 0.5,
         f"data.eval_fraction: must be 0 (no eval set) or in (0, 0.5], got {d.eval_fraction}")
    need(not (d.eval_files and d.eval_fraction), "data.eval_fraction: give data.eval_files or data.eval_fraction, "
                                                 f"not both (got {len(d.eval_files)} files and {d.eval_fraction})")
    _check_files("data.eval_files", d.eval_files, need)
    n = len(d.eval_files)
    need(n in (0, 1, t.clients), f"data.eval_files: give 1 file (sharded) or {t.clients} (one per client), got {n}")
    need(_is_int(cfg.train.eval_every) and cfg.train.eval_every >= 0,
         f"train.eval_every: must be an integer >= 0 (0 = only after the last step), got {cfg.train.eval_every}")


def validate_generate(cfg: Config) -> None:
    """Rules that hold only for `fedsea generate` (a training config need not name prompts)."""
    if not cfg.generate.prompts_files:
        raise ConfigError("generate.prompts_files: required for `fedsea generate` (JSONL files with "
                          "{\"prompt\": ...} or {\"messages\": [...]} records)")
    if cfg.generate.adapters_dir and not Path(cfg.generate.adapters_dir).is_dir():
        raise ConfigError(f"generate.adapters_dir: no such directory {cfg.generate.adapters_dir!r}")


def validate_eval(cfg: Config) -> None:
    """Rules that hold only for `fedsea eval`: an eval set, a readable adapters dir."""
    if not (cfg.data.eval_files or cfg.data.eval_fraction > 0):
        raise ConfigError("data.eval_files: `fedsea eval` needs an eval set; allowed: data.eval_files=[F, ...] "
                          "or data.eval_fraction in (0, 0.5] (the training run's, to score its held-out records)")
    if cfg.eval.adapters_dir and not Path(cfg.eval.adapters_dir).is_dir():
        raise ConfigError(f"eval.adapters_dir: no such directory {cfg.eval.adapters_dir!r}")
    if not (_is_int(cfg.eval.max_records) and cfg.eval.max_records >= 0):
        raise ConfigError(f"eval.max_records: must be an integer >= 0 (0 = all), got {cfg.eval.max_records}")


def check_world_size(clients: int, servers: int, world_size: int) -> None:
    """The launcher must start exactly one rank per client and per server."""
    if clients + servers != world_size:
        raise ConfigError(f"topology.clients ({clients}) + topology.servers ({servers}) = {clients + servers} "
                          f"ranks, but the launcher started {world_size}; run with -n {clients + servers} "
                          f"or change topology.*")
