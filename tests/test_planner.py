"""The partition planner against brute force, its floors and budgets, and its speed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedsea_hpc.adapt.planner import (Costs, Limits, PlanError, assign_balanced, feasible_ks, plan, predict,
                                      round_robin, worth_moving)


def random_costs(rng: np.random.Generator, clients: int, memory: bool = False) -> Costs:
    extra = {}
    if memory:
        extra = dict(client_fixed_mb=rng.uniform(50, 100, clients), client_block_mb=rng.uniform(5, 20, clients))
    return Costs(client_block_s=rng.uniform(0.001, 0.05, clients), client_fixed_s=rng.uniform(0, 0.1, clients),
                 wire_s=rng.uniform(0, 0.05, clients), server_block_s=rng.uniform(0.001, 0.02, clients), **extra)


def brute_force(costs: Costs, limits: Limits, assignment, servers: int, mode: str) -> float:
    allowed = feasible_ks(costs, limits)
    return min(predict(costs, limits.num_layers, ks, assignment, servers, mode) for ks in itertools.product(*allowed))


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("seed", range(12))
def test_plan_matches_brute_force(seed, mode):
    rng = np.random.default_rng(seed)
    clients, servers, L = int(rng.integers(1, 5)), int(rng.integers(1, 3)), int(rng.integers(4, 9))
    costs = random_costs(rng, clients, memory=seed % 2 == 0)
    budgets = [None if rng.random() < 0.5 else float(costs.client_fixed_mb[c] + costs.client_block_mb[c] * 3.5)
               for c in range(clients)] if seed % 2 == 0 else []
    limits = Limits(L, min_head_layers=1, min_tail_layers=1 + seed % 2, client_memory_mb=budgets)
    current = [(1, limits.min_tail_layers)] * clients
    got = plan(costs, limits, current, servers=servers, mode=mode)
    assignment = round_robin(clients, servers)
    assert got.assignment == assignment
    best = brute_force(costs, limits, assignment, servers, mode)
    ks = [p + q for p, q in got.splits]
    assert got.predicted_s == pytest.approx(predict(costs, L, ks, assignment, servers, mode), rel=1e-12)
    assert got.predicted_s == pytest.approx(best, rel=1e-9)
    for (p, q), budget, c in zip(got.splits, budgets or [None] * clients, range(clients)):
        assert p >= limits.min_head_layers and q >= limits.min_tail_layers and p + q < L
        if budget is not None:
            assert costs.client_fixed_mb[c] + costs.client_block_mb[c] * (p + q) <= budget


def test_a_slow_client_keeps_fewer_blocks():
    # One server rank, slower per block than the fast client: clients take blocks from it until the
    # slow client (4x) stays at the floor. By hand: k_slow = 2 (client term 0.026 s); the fast
    # client keeps 9 blocks (0.028 s) and the server runs 9 + 8: 0.028 + 0.004 * 9 = 0.064 s.
    base = dict(client_fixed_s=[0.01, 0.01], wire_s=[0.0, 0.0], server_block_s=[0.004, 0.004])
    limits = Limits(10)
    even = plan(Costs(client_block_s=[0.002, 0.002], **base), limits, [(1, 1), (1, 1)])
    slow = plan(Costs(client_block_s=[0.002, 0.008], **base), limits, [(1, 1), (1, 1)])
    assert even.splits == ((1, 8), (1, 8))
    assert slow.splits == ((1, 8), (1, 1))
    assert slow.predicted_s == pytest.approx(0.028 + 0.004 * 9)
    # A fast server: every client hands all it may back. (Were one client slower, the other would
    # keep blocks up to the slow one's pace: in lockstep they are free and still spare the server.)
    fast = plan(Costs(client_block_s=[0.002, 0.002], client_fixed_s=[0.01, 0.01], wire_s=[0.0, 0.0],
                      server_block_s=[0.0001, 0.0001]), limits, [(2, 2), (1, 3)])
    assert fast.splits == ((1, 1), (1, 1))


def test_ties_keep_the_current_partition():
    costs = Costs(client_block_s=[0.0, 0.0], client_fixed_s=[0.0, 0.0], wire_s=[0.0, 0.0], server_block_s=[0.0, 0.0])
    current = [(2, 3), (1, 1)]
    got = plan(costs, Limits(8), current)
    assert got.splits == tuple(current)


def test_floors_are_respected_and_p_stays_where_it_was():
    rng = np.random.default_rng(3)
    costs = random_costs(rng, 3)
    limits = Limits(12, min_head_layers=3, min_tail_layers=2)
    got = plan(costs, limits, [(3, 2), (4, 2), (3, 5)], mode="sequential")
    for (p, q), p0 in zip(got.splits, (3, 4, 3)):
        assert p >= 3 and q >= 2 and p + q <= 11
        assert p == min(p0, p + q - 2)  # extra blocks go to the tail; p moves only when it must


def test_budgets_no_partition_can_meet_are_an_error_naming_the_key():
    costs = Costs([0.01], [0.0], [0.0], [0.01], client_fixed_mb=[100.0], client_block_mb=[10.0])
    with pytest.raises(PlanError, match=r"split\.client_memory_mb: client 0's budget 110 MiB .* 120\.0 MiB"):
        plan(costs, Limits(8, client_memory_mb=[110.0]), [(1, 1)])
    with pytest.raises(PlanError, match=r"split\.min_head_layers \+ split\.min_tail_layers = 8"):
        plan(costs, Limits(8, min_head_layers=4, min_tail_layers=4), [(4, 4)])
    ok = plan(costs, Limits(8, client_memory_mb=[130.0]), [(1, 1)])
    assert sum(ok.splits[0]) <= 3


def test_bad_cost_vectors_name_the_field():
    with pytest.raises(ValueError, match=r"Costs\.wire_s: one value per client \(2\)"):
        plan(Costs([0.1, 0.1], [0.0, 0.0], [0.0], [0.1, 0.1]), Limits(6), [(1, 1), (1, 1)])
    with pytest.raises(ValueError, match=r"Costs\.server_block_s: values must be finite and >= 0"):
        plan(Costs([0.1], [0.0], [0.0], [float("nan")]), Limits(6), [(1, 1)])
    with pytest.raises(ValueError, match=r"mode: must be one of parallel, sequential"):
        plan(Costs([0.1], [0.0], [0.0], [0.1]), Limits(6), [(1, 1)], mode="fast")


def test_balanced_assignment_evens_server_work():
    assert assign_balanced([5, 4, 3, 3, 3], 2) in {(0, 1, 1, 0, 0), (0, 1, 1, 0, 1)}
    # Two heavy clients that round robin would put on one server rank get separated.
    costs = Costs(client_block_s=[0.05] * 4, client_fixed_s=[0.0] * 4, wire_s=[0.0] * 4,
                  server_block_s=[0.02, 0.001, 0.02, 0.001])
    limits = Limits(8)
    rr = plan(costs, limits, [(1, 1)] * 4, servers=2)
    bal = plan(costs, limits, [(1, 1)] * 4, servers=2, assignment="balanced")
    assert rr.assignment == (0, 1, 0, 1)
    assert bal.assignment[0] != bal.assignment[2]
    assert bal.predicted_s < rr.predicted_s


def test_thirty_blocks_and_sixteen_clients_score_few_candidates():
    """The search is polynomial: at most C·L thresholds per assignment tried, not L^C partitions
    (its wall time is measured by benchmarks/planner.py, not asserted here)."""
    rng = np.random.default_rng(0)
    costs = random_costs(rng, 16, memory=True)
    limits = Limits(30, min_head_layers=2, min_tail_layers=1)
    got = plan(costs, limits, [(2, 1)] * 16, servers=4, assignment="balanced")
    assert len(got.splits) == 16
    assert 0 < got.evaluated <= 9 * 16 * 30
    # No single client can do better on its own (a cheap optimality check at this size).
    ks = [p + q for p, q in got.splits]
    for c, opts in enumerate(feasible_ks(costs, limits)):
        for k in opts:
            trial = list(ks)
            trial[c] = int(k)
            assert predict(costs, 30, trial, got.assignment, 4, "parallel") >= got.predicted_s * (1 - 1e-9)


def test_worth_moving_needs_more_than_the_threshold():
    assert worth_moving(2.0, 1.0, 1.25)
    assert not worth_moving(1.2, 1.0, 1.25)
    assert not worth_moving(1.25, 1.0, 1.25)
