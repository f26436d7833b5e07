"""Client aggregation: a numpy FedAvg reference, then ``ClientSync`` and ``allreduce_sum_`` on 3 gloo ranks.

``ClientSync`` (``fedsea_hpc.federated.client_sync``) is the one FedAvg/FedSGD implementation:
clients may hold different blocks (per-client split points), and every tensor is averaged
(``average_params``) or summed (``sum_grads``) over the clients that hold it only. The 3-rank test
gives the clients different blocks and compares with :func:`weighted_average` below.
"""

from __future__ import annotations

import os
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import with_free_port
from fedsea_hpc.distributed import reduce
from fedsea_hpc.federated.aggregate import allreduce_sum_
from fedsea_hpc.federated.client_sync import ClientSync

WORLD = 3
WEIGHTS = [1.0, 3.0, 0.5]  # per client (its samples), deliberately unequal
# Per-client split points as in a config with split.per_client=[[1,1],[2,1],[1,2]] on 6 blocks.
HELD = {0: [0, 5], 1: [0, 1, 5], 2: [0, 4, 5]}
UNION = sorted(set().union(*HELD.values()))  # [0, 1, 4, 5]
BLOCK_SHAPES = {  # per-block suffix -> shape (every block has the same tensors)
    "self_attn.q_proj.lora_A.weight": (2, 4),
    "self_attn.q_proj.lora_B.weight": (4, 2),
    "mlp.down_proj.lora_A.weight": (2, 6),
}
OTHER_SHAPES = {"model.embed_tokens.weight": (5, 4), "model.norm.weight": (4,)}  # on every client
# (client, name) whose .grad stays None before sum_grads: counts as a zero gradient.
NO_GRAD = {(1, "model.layers.0.self_attn.q_proj.lora_B.weight"), (2, "model.embed_tokens.weight"),
           (0, "model.layers.5.mlp.down_proj.lora_A.weight")}


# ----------------------------------------------------------------------------- the reference


def weighted_average(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_i w_i a_i / sum_i w_i, in float64: the FedAvg every rank must agree on."""
    if not arrays:
        raise ValueError("weighted_average: empty list of arrays")
    if len(weights) != len(arrays):
        raise ValueError(f"weighted_average: {len(arrays)} arrays but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(w >= 0):  # also catches NaN
        raise ValueError(f"weighted_average: weights must be >= 0, got {weights}")
    if w.sum() == 0:
        raise ValueError("weighted_average: weights sum to zero")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"weighted_average: arrays differ in shape: {sorted(shapes)}")
    return sum(wi * np.asarray(a, dtype=np.float64) for wi, a in zip(w, arrays)) / w.sum()


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


def test_single_process_allreduce_sum_is_a_noop_and_refuses_low_precision():
    # No process group initialised: nothing changes.
    assert not dist.is_initialized()
    g = torch.ones(3)
    allreduce_sum_(g)
    assert torch.equal(g, torch.ones(3))
    with pytest.raises(TypeError, match="bfloat16"):
        allreduce_sum_(torch.ones(3, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- 3 gloo ranks


def names_of(client: int) -> list[str]:
    """Canonical HF names of what ``client`` holds: its blocks' tensors, then the non-block ones."""
    return [f"model.layers.{layer}.{suffix}" for layer in HELD[client] for suffix in BLOCK_SHAPES] + list(OTHER_SHAPES)


def shape_of(name: str) -> tuple[int, ...]:
    if name in OTHER_SHAPES:
        return OTHER_SHAPES[name]
    return BLOCK_SHAPES[name.split(".", 3)[3]]


def value(client: int, name: str, what: str) -> torch.Tensor:
    """Deterministic per (client, tensor, param|grad): every rank can rebuild every client's tensors."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{client}:{name}:{what}".encode()))
    return torch.randn(shape_of(name), generator=g)


def holders(name: str) -> list[int]:
    return [c for c in range(WORLD) if name in names_of(c)]


def rank_buffer(rank: int) -> torch.Tensor:
    """A [17] float32 buffer for the allreduce_sum_ check, different on every rank."""
    return torch.randn(17, generator=torch.Generator().manual_seed(100 + rank))


def _check_client_sync(rank: int) -> None:
    # Prepare: this client's parameters (leaves that require grad), a gradient on most of them.
    params = {n: torch.nn.Parameter(value(rank, n, "param")) for n in names_of(rank)}
    for n, p in params.items():
        if (rank, n) not in NO_GRAD:
            p.grad = value(rank, n, "grad")
    sync = ClientSync(list(params.items()), UNION)
    before = {n: p.detach().clone() for n, p in params.items()}

    # Execute / Assert: sum_grads = the sum over the clients holding the tensor, None counting as 0.
    sync.sum_grads()
    for n, p in params.items():
        want = sum(np.zeros(shape_of(n)) if (c, n) in NO_GRAD else value(c, n, "grad").double().numpy()
                   for c in holders(n))
        assert p.grad is not None, n
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=n)
        assert torch.equal(p.detach(), before[n]), f"sum_grads changed the parameter {n}"

    # Execute / Assert: average_params(w) = the sample-weighted mean over the holders only.
    sync.average_params(WEIGHTS[rank])
    for n, p in params.items():
        hs = holders(n)
        want = weighted_average([value(c, n, "param").numpy() for c in hs], [WEIGHTS[c] for c in hs])
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{n} (holders {hs})")
        assert p.is_leaf and p.requires_grad  # updated in place, still the same parameter
    # The cases that make it "over holders only": layer 1 is client 1's alone, layer 4 client 2's.
    if rank == 1:
        n = "model.layers.1.self_attn.q_proj.lora_A.weight"
        torch.testing.assert_close(params[n].detach(), value(1, n, "param"))
    if rank == 2:
        n = "model.layers.4.mlp.down_proj.lora_A.weight"
        torch.testing.assert_close(params[n].detach(), value(2, n, "param"))

    # A bad weight on one client, or holders without samples, fail every client alike (none is
    # left waiting in a collective), and nothing is changed.
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(ValueError, match="negative or non-finite"):
        sync.average_params(float("nan") if rank == 1 else WEIGHTS[rank])
    with pytest.raises(ValueError, match="total weight of zero"):
        sync.average_params(0.0 if rank == 2 else WEIGHTS[rank])  # layer 4 is client 2's alone
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())


def _same_bits_everywhere(t: torch.Tensor, group=None, ranks=range(WORLD)) -> None:
    got = [torch.empty_like(t) for _ in ranks]
    dist.all_gather(got, t, group=group)
    assert all(torch.equal(g, got[0]) for g in got), "ranks ended with different sums"


def _check_allreduce_sum(rank: int) -> None:
    # 3 ranks: the star through rank 0 (a small buffer) and gloo's own all-reduce (a large one).
    for n in (17, reduce.STAR_MAX_BYTES // 4 + 1):
        buf = torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))
        allreduce_sum_(buf)
        want = sum(torch.randn(n, generator=torch.Generator().manual_seed(100 + r)) for r in range(WORLD))
        torch.testing.assert_close(buf, want)
        _same_bits_everywhere(buf)
    # A non-contiguous float64 view is summed in place, the rest of its storage untouched.
    base = torch.full((4, 6), float(rank + 1), dtype=torch.float64)
    reduce.sum_(base[:, ::2])
    assert torch.equal(base[:, ::2], torch.full((4, 3), 6.0, dtype=torch.float64))
    assert torch.equal(base[:, 1::2], torch.full((4, 3), float(rank + 1), dtype=torch.float64))
    # Two ranks (a subgroup): they swap buffers and both add in rank order.
    pair = dist.new_group([1, 2])
    if rank in (1, 2):
        buf = rank_buffer(rank)
        reduce.sum_(buf, group=pair)
        torch.testing.assert_close(buf, rank_buffer(1) + rank_buffer(2))
        _same_bits_everywhere(buf, group=pair, ranks=(1, 2))


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        _check_client_sync(rank)
        dist.barrier()
        _check_allreduce_sum(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_three_rank_client_sync_over_holders_and_allreduce_sum():
    """One spawn of 3 gloo ranks runs every scenario; a failed assertion in any rank fails the test."""
    with_free_port(lambda port: mp.spawn(_worker, args=(port,), nprocs=WORLD, join=True))
