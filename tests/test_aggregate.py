"""Tests for fedsea_hpc.federated.aggregate: pure FedAvg math, then a 3-rank gloo run."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedsea_hpc.federated.aggregate import (allreduce_sum_, fedavg_, normalize_weights,
                                            weighted_average)

WORLD = 3
WEIGHTS = [1.0, 3.0, 0.5]  # per rank, deliberately unequal


def test_equal_weights_give_the_mean():
    # Prepare
    arrays = [np.full((2, 3), v) for v in (1.0, 2.0, 6.0)]
    # Execute
    out = weighted_average(arrays, [2.0, 2.0, 2.0])
    # Assert
    np.testing.assert_allclose(out, np.full((2, 3), 3.0))


def test_one_nonzero_weight_selects_that_array():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(4,)) for _ in range(3)]
    out = weighted_average(arrays, [0.0, 5.0, 0.0])
    np.testing.assert_array_equal(out, arrays[1])


def test_weighted_average_matches_formula():
    arrays = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    np.testing.assert_allclose(weighted_average(arrays, [1.0, 3.0]), [0.25, 0.75])


def test_normalize_weights_sums_to_one():
    w = normalize_weights([1, 1, 2])
    np.testing.assert_allclose(w, [0.25, 0.25, 0.5])


@pytest.mark.parametrize("arrays, weights, match", [
    ([], [], "empty"),
    ([np.zeros(2)], [-1.0], ">= 0"),
    ([np.zeros(2), np.zeros(2)], [0.0, 0.0], "zero"),
    ([np.zeros(2), np.zeros(3)], [1.0, 1.0], "shape"),
    ([np.zeros(2), np.zeros(2)], [1.0], "weights"),
    ([np.zeros(2)], [float("nan")], ">= 0"),
])
def test_weighted_average_errors(arrays, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(arrays, weights)


def test_single_process_wrappers_are_noops():
    # No process group initialised: nothing changes, the own weight comes back.
    assert not dist.is_initialized()
    p = torch.arange(4.0)
    assert fedavg_([p], 2.5) == 2.5
    g = torch.ones(3)
    allreduce_sum_([g, None])
    assert torch.equal(p, torch.arange(4.0)) and torch.equal(g, torch.ones(3))
    with pytest.raises(ValueError):
        fedavg_([p], -1.0)


def rank_params(rank: int) -> list[torch.Tensor]:
    """What rank ``rank`` holds: shapes [3, 4], [5] (fp32) and [2, 2] (bf16)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g),
            torch.randn(2, 2, generator=g).to(torch.bfloat16)]


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        # fedavg_: every rank ends with the weighted average of all ranks' params
        params = [p.requires_grad_(p.is_floating_point()) for p in rank_params(rank)]
        total = fedavg_(params, WEIGHTS[rank])
        assert total == pytest.approx(sum(WEIGHTS))
        for i, p in enumerate(params):
            want = weighted_average([rank_params(r)[i].float().numpy() for r in range(WORLD)],
                                    WEIGHTS)
            tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
            np.testing.assert_allclose(p.detach().float().numpy(), want, rtol=tol, atol=tol)
            assert p.requires_grad  # still a leaf parameter, updated in place

        # allreduce_sum_: the sum, None entries skipped on every rank
        grads = [rank_params(rank)[0], None, rank_params(rank)[1]]
        allreduce_sum_(grads)
        assert grads[1] is None
        for got, i in ((grads[0], 0), (grads[2], 1)):
            want = sum(rank_params(r)[i] for r in range(WORLD))
            torch.testing.assert_close(got, want)

        # a bad weight on one rank raises on all ranks (no rank is left in a collective)
        with pytest.raises(ValueError, match="negative"):
            fedavg_([torch.zeros(2)], -1.0 if rank == 1 else 1.0)
        with pytest.raises(ValueError, match="zero"):
            fedavg_([torch.zeros(2)], 0.0)
        # None at different indices (same buffer size) is caught on all ranks
        mixed = [torch.ones(2), None] if rank == 0 else [None, torch.ones(2)]
        with pytest.raises(ValueError, match="None on some ranks"):
            allreduce_sum_(mixed)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_rank_gloo_fedavg_and_sum():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
