"""``fedsea generate``: split generation with collaborative KV caches, one role per rank.

Clients keep Part A + Part C and their own KV cache; server ranks keep Part B and one KV cache
per round for all the sequences of their clients. Only per-sample prompt lengths, hidden states
``[B, T, H]`` (prompt) / ``[B, 1, H]`` (each later step) and a few control words cross the wire.
Both sides rebuild the left-padded attention mask and position ids from the lengths exactly as
Hugging Face ``generate`` does (:mod:`fedsea_hpc.model.masks`), so greedy outputs equal HF's.
The client loop is :mod:`.client`, the server loop :mod:`.server`.
"""
from __future__ import annotations

from fedsea_hpc.config import validate_generate
from fedsea_hpc.distributed.topology import Role


def check_inputs(job) -> list | None:
    """Every rank reads and checks every client's prompts and the adapter dir before any rank
    communicates, so bad input makes all ranks exit 2 alike. Returns this rank's prompts
    (None on a server rank)."""
    from fedsea_hpc.data.prompts import load_prompts

    cfg, topo = job.cfg, job.topo
    validate_generate(cfg)
    max_pos = job.source.config.max_position_embeddings
    prompts = [load_prompts(cfg.generate, cfg.topology.clients, job.tokenizer, c, max_pos)
               for c in range(cfg.topology.clients)]
    follow_adapters(job, cfg.generate.adapters_dir, "generate.adapters_dir")
    return prompts[topo.client_index] if topo.role is Role.CLIENT else None


def follow_adapters(job, root: str, key: str) -> None:
    """Check the adapter dir ``root`` (config key ``key``; nothing when empty) against this model,
    at the partition it was saved at: a run that rebalanced saved its final partition, which
    ``split.per_client`` then follows (rank 0 says so)."""
    from fedsea_hpc.distributed.env import say
    from fedsea_hpc.model.adapters import check_adapters, saved_partition

    if not root:
        return
    cfg = job.cfg
    saved = saved_partition(root, cfg.topology.clients, key=key)
    if saved is not None and saved != cfg.splits():
        if job.topo.rank == 0:
            say(f"fedsea: note: {key} was saved at split.per_client={[list(x) for x in saved]} "
                f"(the training run's final partition); using it instead of {[list(x) for x in cfg.splits()]}")
        cfg.split.per_client = [list(x) for x in saved]
    check_adapters(root, job.source, cfg.splits(), key=key, model_name=cfg.model.name_or_path)


def generate_split(job, prompts, devices) -> dict | None:
    """Run this rank's role on ``devices`` (:class:`~fedsea_hpc.distributed.devices.Devices`);
    rank 0 returns (and writes) the job summary."""
    if job.topo.role is Role.CLIENT:
        from fedsea_hpc.generate.client import run_client

        return run_client(job.cfg, job.topo, job.source, job.tokenizer, prompts, job.dtype, devices)
    from fedsea_hpc.generate.server import run_server

    return run_server(job.cfg, job.topo, job.source, job.dtype, devices)
