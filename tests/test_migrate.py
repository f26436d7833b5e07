"""Live migration's pure parts and its one collective (three gloo processes, no DeepSpeed)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from fedsea_hpc.adapt import migrate
from fedsea_hpc.adapt.migrate import SERVER, Move

L = 6


def test_holders_and_moves():
    h = migrate.holders(L, [(1, 1), (2, 1)])
    assert h[0] == {0, 1} and h[1] == {1, SERVER} and h[2] == {SERVER} and h[5] == {0, 1}
    assert migrate.moves(L, [(1, 1), (1, 1)], [(1, 1), (1, 1)]) == []
    # both clients take block 1 from the server; the server keeps 2..4
    assert migrate.moves(L, [(1, 1), (1, 1)], [(2, 1), (2, 1)]) == [Move(1, frozenset({SERVER}), frozenset({0, 1}))]
    # client 1 hands block 4 back (the server already runs it for client 0): only block 4 changes
    ms = migrate.moves(L, [(1, 1), (1, 2)], [(1, 1), (1, 1)])
    assert ms == [Move(4, frozenset({1, SERVER}), frozenset({SERVER}))]


def test_merge_groups_are_ordered_and_keyed_by_all_holders():
    ms = migrate.moves(L, [(1, 1), (1, 1), (1, 1)], [(2, 2), (1, 1), (2, 1)])
    groups = migrate.merge_groups(ms)
    assert groups == [(frozenset({0, 2, SERVER}), [1]), (frozenset({0, SERVER}), [4])]
    assert migrate.ranks_of(frozenset({0, 2, SERVER}), [0, 1, 2], [3, 4]) == [0, 2, 3, 4]


def test_copy_weights_follow_the_samples_that_train_each_copy():
    # block 1: client 1 holds it; the server runs it for client 0 (p=1) only
    w = migrate.copy_weights(L, [(1, 1), (2, 1)], 1, rows=[4, 4])
    assert w == {1: 0.5, SERVER: 0.5}
    w = migrate.copy_weights(L, [(1, 1), (1, 1), (2, 1)], 1, rows=[4, 4, 4])
    assert w == pytest.approx({2: 1 / 3, SERVER: 2 / 3})
    # block 3 is in the server's union but in no client's server span: its server copy weighs 0
    w = migrate.copy_weights(L, [(1, 3), (4, 1)], 3, rows=[2, 2])
    assert w == {0: 0.5, 1: 0.5, SERVER: 0.0}
    assert migrate.copy_weights(L, [(1, 3), (4, 1)], 3, rows=[0, 0]) == pytest.approx(
        {0: 1 / 3, 1: 1 / 3, SERVER: 1 / 3})  # nothing trained any copy: they count equally


def test_names_for_any_block_from_one_template():
    named = [("model.layers.0.a.weight", torch.zeros(2, 3)), ("model.layers.0.b.weight", torch.zeros(4)),
             ("model.layers.5.a.weight", torch.zeros(2, 3)), ("model.layers.5.b.weight", torch.zeros(4)),
             ("model.embed_tokens.weight", torch.zeros(7, 2))]
    names = migrate.names_for(named, [2])
    assert names == {2: [("model.layers.2.a.weight", torch.Size([2, 3])), ("model.layers.2.b.weight", torch.Size([4]))]}


def test_moved_state_takes_merged_for_changed_blocks_only():
    old = {"model.layers.0.w": "old0", "model.embed_tokens.weight": "oldE"}
    merged = {"model.layers.1.w": "merged1"}
    moved = migrate.Moved(old, merged, {1}, 3.0)
    named = [("model.layers.0.w", None), ("model.layers.1.w", None), ("model.embed_tokens.weight", None)]
    assert moved.for_part(named) == {"model.layers.0.w": "old0", "model.layers.1.w": "merged1",
                                     "model.embed_tokens.weight": "oldE"}
    with pytest.raises(RuntimeError, match="no state for model.layers.2.w"):
        moved.for_part([("model.layers.2.w", None)])


def test_torch_state_round_trip_keeps_adamw_exact():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([a], lr=1e-2)
    for _ in range(3):
        a.grad = torch.randn(5)
        opt.step()
    state, step = migrate.torch_state([("x", a)], opt)
    assert step == 3.0
    b = torch.nn.Parameter(torch.zeros(5))
    opt_b = torch.optim.AdamW([b], lr=1e-2)
    migrate.load_torch_state([("x", b)], opt_b, state, step)
    g = torch.randn(5)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    opt_b.step()
    assert torch.equal(a.detach(), b.detach())


def _merge_worker(rank: int, port: int, out: dict) -> None:
    """Ranks 0, 1: clients; rank 2: the server. Block 1 goes from client 1 and the server
    (client 0 runs it there) to client 0 as well: all three merge, weighted 1/2, 1/2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)

    class Topo:
        client_ranks, server_ranks = [0, 1], [2]

    Topo.rank = rank
    me = SERVER if rank == 2 else rank
    old_splits, new_splits = [(1, 1), (2, 1)], [(2, 1), (2, 1)]
    name = "model.layers.1.w"
    own = {1: torch.tensor([1.0, 2.0]), SERVER: torch.tensor([3.0, 6.0])}
    old_state = {}
    if me in own:
        old_state[name] = {"param": own[me], "exp_avg": own[me] * 10, "exp_avg_sq": own[me] * 100}
    named = [(name if me != 0 else "model.layers.0.w", torch.zeros(2))]
    moved = migrate.exchange(L, old_splits, new_splits, [4, 4], me=me, contributes=True, old_state=old_state,
                             step=5.0, named=named, topo=Topo, dtype=torch.float32, device=torch.device("cpu"))
    out[rank] = {k: v.tolist() for k, v in moved.merged.get(name, {}).items()}, sorted(moved.changed)
    dist.destroy_process_group()


def test_merge_is_the_weighted_average_on_every_holder():
    out = mp.Manager().dict()
    mp.spawn(_merge_worker, args=(free_port(), out), nprocs=3, join=True)
    want = {"param": [2.0, 4.0], "exp_avg": [20.0, 40.0], "exp_avg_sq": [200.0, 400.0]}
    for r in range(3):
        merged, changed = out[r]
        assert changed == [1]
        assert merged.keys() == want.keys() and all(merged[k] == pytest.approx(want[k]) for k in want)
