"""Secure aggregation: masks cancel exactly, and what a client contributes reveals nothing of any
client's update. The multi-rank case runs the real entry point with 3 clients (FedSGD, auto on)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import check_ok, run_fedsea
from fedsea_hpc.privacy.secure_agg import FRACTION_BITS, SecureSum, keystream, modulus_bits

KEYS = {(0, 1): b"a" * 32, (0, 2): b"b" * 32, (1, 2): b"c" * 32}


def _clients(n=3) -> list[SecureSum]:
    return [SecureSum(i, n, None, {j: KEYS[tuple(sorted((i, j)))] for j in range(n) if j != i}) for i in range(n)]


def test_pairwise_masks_cancel_in_the_sum_and_the_fixed_point_sum_is_exact():
    ss = _clients()
    m = ss[0].modulus
    masks = [s.mask(10_000) for s in ss]
    assert all(((0 <= k) & (k < m)).all() for k in masks)
    assert bool((torch.remainder(sum(masks), m) == 0).all())
    x = [torch.randn(10_000, dtype=torch.float64) * 10 ** (i - 1) for i in range(3)]
    total = torch.remainder(sum(torch.remainder(s.encode(v) + k, m) for s, v, k in zip(ss, x, masks)), m)
    err = (ss[0].decode(total) - sum(x)).abs().max().item()
    assert err <= 3 * 2.0 ** -(FRACTION_BITS + 1)  # one rounding per client, nothing else


def test_keystream_depends_on_key_and_call_and_has_the_modulus_range():
    bits = modulus_bits(3)
    a, b = keystream(b"k" * 32, 0, 4096, bits), keystream(b"k" * 32, 1, 4096, bits)
    assert not torch.equal(a, b) and not torch.equal(a, keystream(b"j" * 32, 0, 4096, bits))
    assert torch.equal(a, keystream(b"k" * 32, 0, 4096, bits))  # both ends of a pair derive the same stream
    assert int(a.min()) >= 0 and int(a.max()) < 1 << bits
    assert abs(a.double().mean().item() / (1 << bits) - 0.5) < 0.03  # uniform


def test_modulus_leaves_room_for_the_sum():
    for n in (2, 3, 4, 5, 8, 9, 64):
        assert n * (1 << modulus_bits(n)) <= 1 << 63


def test_an_update_outside_the_fixed_point_range_is_refused():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        s = SecureSum(0, 1, None, {})
        flat = torch.tensor([1.0, -2.5])
        s(flat)
        assert flat.tolist() == [1.0, -2.5]
        with pytest.raises(ValueError, match="fixed-point range"):
            s(torch.tensor([1e12]))
        with pytest.raises(ValueError, match="fixed-point range"):
            s(torch.tensor([float("nan")]))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ real entry point, 3 clients


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secagg")
    check_ok(run_fedsea([f"run.output_dir={out}", "topology.clients=3", "topology.servers=1", "train.steps=2",
                         "privacy.noise_std=0", "debug.dump_aggregation_steps=2"], n=4))
    return out


def _signed(q: torch.Tensor, m: int) -> torch.Tensor:
    return torch.where(q >= m // 2, q - m, q).double()


@pytest.mark.multirank
def test_three_clients_sum_exactly_while_each_contribution_is_noise(run3):
    assert json.loads((run3 / "summary.json").read_text())["secure_aggregation"] is True
    m = 1 << modulus_bits(3)
    for call in (0, 1):
        got = [torch.load(run3 / "secagg" / f"call{call}" / f"client{c}.pt") for c in range(3)]
        raw = [g["raw"] for g in got]
        n = raw[0].numel()
        assert n > 5_000 and all(g["masked"].numel() == n for g in got)
        # The sum is exact: the masks cancel modulo M.
        assert torch.equal(torch.remainder(sum(raw), m), got[0]["total"])
        assert all(torch.equal(g["total"], got[0]["total"]) for g in got)
        for i in range(3):
            masked = got[i]["masked"].double()
            # What client i puts on the wire is uniform on [0, M) ...
            assert abs(masked.mean().item() / m - 0.5) < 5 / (12 * n) ** 0.5
            # ... and uncorrelated with every client's raw update, its own included.
            for j in range(3):
                r = torch.corrcoef(torch.stack([masked, _signed(raw[j], m)]))[0, 1].item()
                assert abs(r) < 5 / n ** 0.5, (call, i, j, r)
            # The raw update sits in a sliver of [0, M) around 0 (it would read in the clear);
            # the masked one spreads over all of it (std of a uniform: M / sqrt(12)).
            assert _signed(raw[i], m).abs().max().item() < m * 1e-6
            assert abs(masked.std().item() / m - 12 ** -0.5) < 0.02
