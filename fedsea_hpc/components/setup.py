"""Everything a job needs before its ranks talk: config, topology, tokenizer, model source.

All of it can fail on bad input, and none of it communicates, so every rank fails alike with
the same one-line ``ValueError`` (``ConfigError``, ``ModelLoadError``, ``DataError``) and the
command line turns it into exit code 2 before anyone waits in a collective.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedsea_hpc.config import ONE_PROCESS_MODES, Config, ConfigError, check_world_size, load_config, validate
from fedsea_hpc.distributed.env import LaunchInfo, say
from fedsea_hpc.stack import ALLOW_ENV, check_stack


@dataclass
class Job:
    """One rank's view of a job, ready to start. ``topo`` is None in the one-process modes
    (``train.mode`` centralized, local)."""

    cfg: Config
    topo: object | None  # Topology
    source: object  # ModelSource
    tokenizer: object
    dtype: object  # torch.dtype
    resume: object = None  # components.checkpoint.Resume: the checkpoint this run continues from
    data: object = None  # load_data: (train, eval or None) per client this rank holds; None elsewhere


def load_job_config(config_path: str | None, overrides: list[str], launch: LaunchInfo, job: str) -> Config:
    """Library versions, config and world size only: cheap, so every rank reports a bad key
    within a fraction of a second, before a launcher can tear the job down because one rank
    already left."""
    for warning in check_stack():
        if launch.rank == 0:
            say(f"fedsea: warning: {warning} (running untested: {ALLOW_ENV}=1)")
    cfg = load_config(config_path, overrides)
    if job == "train" and cfg.train.mode in ONE_PROCESS_MODES:
        if launch.world_size != 1:
            raise ConfigError(f"train.mode: {cfg.train.mode} runs in one process, but the launcher started "
                              f"{launch.world_size}; run it without mpiexec or with -n 1")
    else:
        check_world_size(cfg.topology.clients, cfg.topology.servers, launch.world_size)
    return cfg


def prepare(cfg: Config, launch: LaunchInfo, job: str) -> Job:
    """Tokenizer, model source (config and tensor index only) and the split points checked."""
    import torch

    from fedsea_hpc.adapt.memory import check_budgets
    from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE, load_tokenizer
    from fedsea_hpc.distributed.topology import Topology
    from fedsea_hpc.model.loading import resolve_model

    one_process = job == "train" and cfg.train.mode in ONE_PROCESS_MODES  # one process, no topology
    topo = None if one_process else Topology(cfg.topology.clients, cfg.topology.servers, launch.rank,
                                             launch.world_size)
    m = cfg.model
    tokenizer = load_tokenizer(m.name_or_path, cache_dir=m.cache_dir or None)
    source = resolve_model(m.name_or_path, tiny_vocab_size=TINY_VOCAB_SIZE, seed=cfg.run.seed,
                           cache_dir=m.cache_dir or None,
                           tiny_overrides=dict(hidden_size=m.tiny_hidden_size, num_hidden_layers=m.tiny_layers,
                                               num_attention_heads=m.tiny_heads, num_key_value_heads=m.tiny_kv_heads,
                                               intermediate_size=m.tiny_intermediate_size))
    source.config._attn_implementation = m.attn_implementation
    validate(cfg, num_layers=source.config.num_hidden_layers)
    check_budgets(cfg, source.config, getattr(torch, m.dtype))
    resume = None
    if job == "train":
        from fedsea_hpc.components import checkpoint

        if one_process and (cfg.run.save_every or cfg.run.resume != "off"):
            raise ConfigError("run.save_every / run.resume: checkpoints are written by the split modes only "
                              f"(train.mode parallel or sequential), not {cfg.train.mode}")
        resume = checkpoint.find(cfg.run)
        if resume is not None:
            resume = checkpoint.check_resume(resume, cfg, launch.rank)
    splits = resume.splits if resume is not None else cfg.splits()
    if topo is not None and resume is not None and resume.meta["servers"] == topo.servers and resume.same_clients:
        topo.place(resume.meta["placement"])  # where the clients were (topology.assignment may have moved them)
    elif topo is not None and cfg.topology.assignment == "balanced":
        from fedsea_hpc.adapt.planner import static_placement

        topo.place(static_placement(splits, source.config.num_hidden_layers, topo.servers))
    return Job(cfg, topo, source, tokenizer, getattr(torch, m.dtype), resume)


def load_data(job: Job) -> None:
    """The training and eval sets this rank holds, into ``job.data``: a client rank its own
    ``(train, eval)``, ``train.mode=centralized`` / ``local`` every client's (a list), a server rank none.
    Reads and tokenizes the files (no communication), so a bad file fails here with a one-line
    ``DataError`` that the launch turns into every rank's error (``process.preflight``)."""
    from fedsea_hpc.data.dataset import client_datasets
    from fedsea_hpc.distributed.topology import Role

    cfg, topo = job.cfg, job.topo
    common = dict(tokenizer=job.tokenizer, seq_len=cfg.train.seq_len, seed=cfg.run.seed)
    if topo is None:
        job.data = [client_datasets(cfg.data, c, cfg.topology.clients, **common) for c in range(cfg.topology.clients)]
    elif topo.role is Role.CLIENT:
        silo = (None, None) if job.resume is None else (job.resume.silos[topo.client_index], job.resume.shards)
        job.data = client_datasets(cfg.data, topo.client_index, topo.clients, **common, silo=silo[0], shards=silo[1])
