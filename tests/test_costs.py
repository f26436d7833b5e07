"""The cost model's arithmetic: per-block rates, smoothing, the job-wide slot vector."""
from __future__ import annotations

import pytest
import torch

from fedsea_hpc.adapt.costs import SLOT, CostMeter, Ewma, job_costs
from fedsea_hpc.adapt.planner import Costs


def test_ewma_starts_at_the_first_value_then_smooths():
    e = Ewma(alpha=0.5)
    assert e.update(4.0) == 4.0
    assert e.update(2.0) == 3.0


def test_client_block_and_fixed_costs_come_from_its_a_phase_and_total_compute():
    m = CostMeter(rank=0, world_size=2)
    m.observe_client(0, a_phase_s=9.0, compute_s=99.0, p=2, q=1, row_tokens=10)  # warm-up step: ignored
    assert m.block.value is None
    m.observe_client(1, a_phase_s=0.2, compute_s=0.5, p=2, q=1, row_tokens=100)
    assert m.block.value == pytest.approx(0.1 / 100)  # one block = A phase / p
    assert m.fixed.value == pytest.approx((0.5 - 0.1 * 3) / 100)  # the rest, beyond p + q blocks
    assert m.tokens.value == 100


def test_the_slot_vector_sums_into_per_client_planner_costs():
    # World: clients 0, 1 on server rank 2 (world 3). Each rank fills its own slot; the sum is the view.
    c0, c1, srv = CostMeter(0, 3), CostMeter(1, 3), CostMeter(2, 3)
    c0.observe_client(1, a_phase_s=0.01, compute_s=0.05, p=1, q=1, row_tokens=100)
    c1.observe_client(1, a_phase_s=0.04, compute_s=0.10, p=1, q=1, row_tokens=200)
    srv.observe_server(1, compute_s=0.6, row_token_blocks=100 * 4 + 200 * 4)
    c1.set_link(0.002, 8 / 100e6)  # the probe found 2 ms and 100 Mbit/s
    assert job_costs(c0.slot_vector() + c1.slot_vector(), 2, [2, 2], 256) is None  # no server rate yet
    got = job_costs(c0.slot_vector() + c1.slot_vector() + srv.slot_vector(), 2, [2, 2], 256)
    assert got["client_block_s"] == pytest.approx([0.01, 0.04])
    assert got["client_fixed_s"] == pytest.approx([0.03, 0.02])
    assert got["server_block_s"] == pytest.approx([0.6 / 1200 * 100, 0.6 / 1200 * 200])
    assert got["wire_s"] == pytest.approx([0.0, 5 * 0.002 + 4 * 200 * 256 * 8 / 100e6])  # 5 crossings
    assert c0.slot_vector().shape == (3 * SLOT,) and torch.count_nonzero(c0.slot_vector()[SLOT:]) == 0
    Costs(got["client_block_s"], got["client_fixed_s"], got["wire_s"], got["server_block_s"]).arrays()  # accepted
