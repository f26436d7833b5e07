"""The rebalancing policy (when to plan, whether to move, what is recorded) and its config checks.

The migration itself is proven end to end in ``test_multirank_train.py`` (moved runs reproduce
centralized losses); its pure parts are in ``test_migrate.py``.
"""
from __future__ import annotations

import pytest

from fedsea_hpc.adapt import planner
from fedsea_hpc.adapt.rebalance import MEASURE_STEPS, Rebalancer
from fedsea_hpc.config import ConfigError, load_config
from fedsea_hpc.config.validate import validate

L = 6


def _rb(*overrides: str) -> Rebalancer:
    return Rebalancer(load_config(None, ["topology.clients=2", "train.steps=40", *overrides]), L)


def test_when_a_decision_is_due():
    assert not any(_rb().due(s) for s in range(40))  # off by default
    assert [s for s in range(40) if _rb("split.rebalance=once").due(s)] == [5]
    every = _rb("split.rebalance=every", "split.rebalance_every=10", "split.rebalance_warmup_steps=3")
    assert [s for s in range(40) if every.due(s)] == [3, 13, 23, 33]
    forced = _rb("split.rebalance=every", "debug.partition_schedule=[[7,2,1],[14,1,1]]")
    assert [s for s in range(40) if forced.due(s)] == [7, 14]  # the schedule overrides split.rebalance


def _costs(slow: float) -> dict:
    # client 1 pays `slow` x client 0 per block; a server block costs what a client 0 block does
    return {"client_block_s": [0.01, 0.01 * slow], "client_fixed_s": [0.005, 0.005], "wire_s": [0.001, 0.001],
            "server_block_s": [0.01, 0.01]}


def test_plans_only_with_costs_and_a_big_enough_gain():
    rb = _rb("split.rebalance=once", "split.per_client=[[2,2],[2,2]]")
    assert rb._plan(5, None) == (None, {"step": 5, "old": [[2, 2], [2, 2]], "reason": "no costs measured yet"})
    new, rec = rb._plan(5, _costs(4))
    assert new is not None and sum(new[0][1]) == 2 and rec["reason"] == "planned"  # the slow client sheds blocks
    assert new[1] == (0, 0) and "old_assignment" not in rec  # one server: nothing to place
    assert rec["predicted_old_s"] / rec["predicted_new_s"] > 1.25
    new, rec = rb._plan(5, _costs(1.05))  # nearly even: the plan may differ, but not by 1.25x
    assert new is None and rec["reason"].startswith(("predicted gain below", "the current partition"))
    eager = _rb("split.rebalance=once", "split.per_client=[[2,2],[2,2]]", "split.rebalance_min_gain=1.0")
    assert eager._plan(5, _costs(1.05))[0] is not None


def test_records_are_measured_after_the_move():
    rb = _rb("split.rebalance=once")
    for s in range(5):
        rb.observe(s, 1.0)
    rb.follow(([(2, 1), (1, 1)], (0, 0)))
    rec = rb.applied({"step": 5, "old": [[1, 1], [1, 1]]}, ([(2, 1), (1, 1)], (0, 0)), 0.3)
    assert rb.splits == [(2, 1), (1, 1)]
    got = [rb.observe(s, 0.5) for s in range(5, 5 + 1 + MEASURE_STEPS)]
    assert got[:-1] == [None] * MEASURE_STEPS  # the first step on the new partition is warm-up
    assert got[-1] == {"step": 5, "measured_old_s": 1.0, "measured_new_s": 0.5}
    assert rb.finish() == {"final_partition": [[2, 1], [1, 1]], "rebalances": [rec]}
    assert rec["migrate_s"] == 0.3 and rec["new"] == [[2, 1], [1, 1]]


def _rb4(*overrides: str) -> Rebalancer:
    cfg = load_config(None, ["topology.clients=4", "topology.servers=2", "train.steps=40",
                             "topology.assignment=balanced", *overrides])
    return Rebalancer(cfg, L, planner.static_placement(cfg.splits(), L, 2))


def test_balanced_placement_is_re_planned_with_the_split_points():
    # Clients 0 and 2 keep 2 blocks (4 on the server), 1 and 3 keep 4 (2 on the server):
    # round-robin would give server 0 8 blocks of work and server 1 4; balanced pairs them up.
    rb = _rb4("split.per_client=[[1,1],[2,2],[1,1],[2,2]]", "debug.partition_schedule=[[3,1,1]]")
    assert rb.placement == (0, 0, 1, 1) != planner.round_robin(4, 2)
    new, rec = rb._plan(3, None)  # forced: every client [1, 1], equal work, so client c on server c % 2
    assert new == ([(1, 1)] * 4, (0, 1, 0, 1)) and rec["old_assignment"] == [0, 0, 1, 1]
    rb.follow(new)
    assert rb.applied(rec, new, 0.1)["new_assignment"] == [0, 1, 0, 1]
    assert rb.finish()["final_assignment"] == [0, 1, 0, 1]

    # Planned from costs: a split that would leave one server doing all the work moves clients too.
    costs = {"client_block_s": [0.01] * 4, "client_fixed_s": [0.005] * 4, "wire_s": [0.001] * 4,
             "server_block_s": [0.01] * 4}
    rr = _rb4("split.rebalance=once", "split.per_client=[[1,1],[2,2],[1,1],[2,2]]", "split.rebalance_min_gain=1.0")
    rr.placement = planner.round_robin(4, 2)  # start unbalanced
    new, rec = rr._plan(5, costs)
    assert new is not None and rec["predicted_new_s"] < rec["predicted_old_s"]
    work = [0.0, 0.0]
    for (p, q), s in zip(new[0], new[1]):
        work[s] += L - p - q
    assert abs(work[0] - work[1]) <= 2  # the busiest server no longer carries twice the other's blocks


def test_round_robin_never_moves_a_client_between_servers():
    cfg = load_config(None, ["topology.clients=4", "topology.servers=2", "split.rebalance=once",
                             "split.per_client=[[1,1],[2,2],[1,1],[2,2]]", "split.rebalance_min_gain=1.0"])
    rb = Rebalancer(cfg, L)
    costs = {"client_block_s": [0.01] * 4, "client_fixed_s": [0.005] * 4, "wire_s": [0.001] * 4,
             "server_block_s": [0.01] * 4}
    new, rec = rb._plan(5, costs)
    assert (new is None or new[1] == (0, 1, 0, 1)) and "old_assignment" not in rec


@pytest.mark.parametrize("override,message", [
    ("split.rebalance=sometimes", r"split\.rebalance"),
    ("topology.assignment=random", r"topology\.assignment: .*round_robin.*balanced"),
    ("split.rebalance_every=0", r"split\.rebalance_every: must be an integer >= 1, got 0"),
    ("split.rebalance_warmup_steps=1", r"split\.rebalance_warmup_steps: must be an integer >= 2"),
    ("split.rebalance_min_gain=0.9", r"split\.rebalance_min_gain: must be a number >= 1, got 0\.9"),
    ("debug.partition_schedule=[[3,2]]", r"debug\.partition_schedule: must be a list of \[step, p, q\]"),
    ("debug.partition_schedule=[[0,2,1]]", r"debug\.partition_schedule: steps must be strictly ascending, >= 1"),
    ("debug.partition_schedule=[[5,2,1],[3,1,1]]", r"debug\.partition_schedule: steps must be strictly ascending"),
    ("debug.partition_schedule=[[40,2,1]]", r"< train\.steps \(40\)"),
])
def test_bad_rebalance_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.steps=40", override])


def test_a_schedule_must_fit_the_model_and_the_floors():
    cfg = load_config(None, ["debug.partition_schedule=[[3,3,3]]"])
    with pytest.raises(ConfigError, match=r"debug\.partition_schedule\[0\]: .* p \+ q < 6 layers; got p=3, q=3"):
        validate(cfg, num_layers=L)
    cfg = load_config(None, ["split.min_head_layers=2", "split.head_layers=2", "debug.partition_schedule=[[3,1,1]]"])
    with pytest.raises(ConfigError, match=r"debug\.partition_schedule\[0\]: need p >= split\.min_head_layers \(2\)"):
        validate(cfg, num_layers=L)


def test_a_placement_decides_who_serves_whom():
    from fedsea_hpc.distributed.topology import Topology

    topo = Topology(4, 2, rank=4, world_size=6)
    assert topo.assignment == [0, 1, 0, 1] and topo.clients_of(4) == [0, 2]  # round-robin
    topo.place((0, 0, 1, 1))
    assert [topo.server_of(c) for c in range(4)] == [4, 4, 5, 5] and topo.clients_of(5) == [2, 3]
    with pytest.raises(ValueError, match=r"placement: one server index in 0\.\.1 per client \(4\), got \[0, 2, 0, 0\]"):
        topo.place((0, 2, 0, 0))
    with pytest.raises(ValueError, match="per client"):
        topo.place((0, 1))
    assert planner.static_placement([(1, 1), (2, 2), (1, 1), (2, 2)], L, 2) == (0, 0, 1, 1)
