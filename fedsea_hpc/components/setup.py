"""Everything a job needs before its ranks talk: config, topology, tokenizer, model source.

All of it can fail on bad input, and none of it communicates, so every rank fails alike with
the same one-line :class:`~fedsea_hpc.errors.InputError` (``ConfigError``, ``ModelLoadError``,
``DataError``; a library's error from reading the model is wrapped with its key) and the command
line turns it into exit code 2 before anyone waits in a collective. :func:`make_room` then clears
``run.output_dir`` of an earlier run (moved aside) once every rank has passed.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedsea_hpc.components import rundir
from fedsea_hpc.config import ONE_PROCESS_MODES, Config, ConfigError, check_world_size, load_config, validate
from fedsea_hpc.distributed.env import LaunchInfo, say
from fedsea_hpc.errors import InputError, from_input, one_line
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
    rundir.check(cfg.run.output_dir)
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
    with from_input("model.name_or_path", MODEL_ALLOWED):  # a library's error reading it names the key
        source = resolve_model(m.name_or_path, tiny_vocab_size=TINY_VOCAB_SIZE, seed=cfg.run.seed,
                               cache_dir=m.cache_dir or None,
                               tiny_overrides=dict(hidden_size=m.tiny_hidden_size, num_hidden_layers=m.tiny_layers,
                                                   num_attention_heads=m.tiny_heads,
                                                   num_key_value_heads=m.tiny_kv_heads,
                                                   intermediate_size=m.tiny_intermediate_size))
        tokenizer = load_tokenizer(m.name_or_path, cache_dir=m.cache_dir or None)
    check_tokenizer(tokenizer, source.config, m.name_or_path)
    if job in ("train", "eval") and cfg.train.seq_len > source.config.max_position_embeddings:  # generate: unused
        raise ConfigError(f"train.seq_len: {cfg.train.seq_len} is beyond the model's "
                          f"{source.config.max_position_embeddings} positions; allowed: 2 .. "
                          f"{source.config.max_position_embeddings}")
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


MODEL_ALLOWED = ("'tiny', a Llama checkpoint dir (config.json, *.safetensors, a tokenizer), a .gguf file, "
                 "or a hub id org/name")


def check_tokenizer(tokenizer, config, name: str) -> None:
    """The tokenizer's ids must index the model's embedding: a tokenizer of another model is refused."""
    n = len(tokenizer)
    if n > config.vocab_size:
        raise ConfigError(f"model.name_or_path: {name}: its tokenizer has {n} tokens but the model's vocab_size "
                          f"is {config.vocab_size}; allowed: a tokenizer of this model (at most vocab_size tokens)")


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


def make_room(job: Job, kind: str, launch: LaunchInfo, store) -> None:
    """Once every rank passed its checks, rank 0 moves an earlier run in ``run.output_dir`` aside
    (:func:`rundir.make_room`) while the others wait in a second preflight stage on ``store``
    (None: one process), so no rank writes there first; a move that fails is every rank's
    one-line error."""
    cfg, problem = job.cfg, None
    if launch.rank == 0:
        inside = job.resume is not None and rundir.is_inside(job.resume.path, cfg.run.output_dir)
        try:
            moved = rundir.make_room(cfg.run.output_dir, kind, cfg.run.overwrite, resuming_inside=inside)
            if moved:
                say(f"fedsea: note: run.output_dir {cfg.run.output_dir} held an earlier {kind} run; moved it to "
                    f"{moved} (run.overwrite=true replaces it instead)")
        except (InputError, OSError) as e:
            problem = str(e) if isinstance(e, InputError) else \
                f"run.output_dir: cannot clear {cfg.run.output_dir} for this run ({one_line(e)})"
    if store is not None:
        from fedsea_hpc.distributed import process

        process.preflight(store, launch, problem, cfg.comm.startup_timeout_s, stage="output-dir")
    elif problem:
        raise InputError(problem)
