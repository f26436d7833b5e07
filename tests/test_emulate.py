"""Emulated heterogeneity: the delays it adds and the config rules."""
from __future__ import annotations

import pytest
import torch

from fedsea_hpc.adapt.emulate import Emulator, emulation_report
from fedsea_hpc.components.metrics import PHASES
from fedsea_hpc.config import ConfigError, load_config
from fedsea_hpc.transport.wire import HEADER_BYTES


def test_slowdown_sleeps_factor_minus_one_times_the_phase():
    times = dict.fromkeys(PHASES, 0.0)
    Emulator(slowdown=3.0).stretch(0.01, times)
    assert times["emulated_compute_s"] == pytest.approx(0.02)
    Emulator().stretch(0.01, times)  # factor 1: nothing
    assert times["emulated_compute_s"] == pytest.approx(0.02)


def test_a_message_is_delayed_by_latency_plus_its_bytes_at_the_link_rate():
    emu = Emulator(link_mbps=100.0, latency_ms=2.0)
    h = torch.zeros(4, 16, 64)  # 16 KiB of float32
    nbytes = h.numel() * 4 + HEADER_BYTES
    assert emu.link_delay_s(nbytes) == pytest.approx(0.002 + nbytes * 8 / 100e6)
    times = dict.fromkeys(PHASES, 0.0)
    emu.message(torch.zeros(4, dtype=torch.int64), h, times=times)
    assert times["emulated_link_s"] == pytest.approx(emu.link_delay_s(32 + HEADER_BYTES) + emu.link_delay_s(nbytes))
    assert not Emulator().active and Emulator(latency_ms=1).active


def test_each_client_gets_its_own_factors_and_the_summary_says_emulated():
    cfg = load_config(None, ["topology.clients=2", "emulate.client_slowdown=[1, 4]", "emulate.link_mbps=[0, 100]"])
    assert Emulator.for_client(cfg.emulate, 0) == Emulator(1.0, 0.0, 0.0)
    assert Emulator.for_client(cfg.emulate, 1) == Emulator(4.0, 100.0, 0.0)
    assert emulation_report(cfg.emulate) == {"emulated": {"client_slowdown": [1, 4], "link_mbps": [0, 100]}}
    assert emulation_report(load_config(None, []).emulate) == {}


@pytest.mark.parametrize("override,message", [
    ("emulate.client_slowdown=[2]", r"emulate\.client_slowdown: must hold one number per client \(2\), got \[2\]"),
    ("emulate.client_slowdown=[1, 0.5]", r"emulate\.client_slowdown: every value must be a number >= 1"),
    ("emulate.link_mbps=[1, -3]", r"emulate\.link_mbps: every value must be a number >= 0 \(0 = no limit\)"),
    ("emulate.link_latency_ms=[true, 1]", r"emulate\.link_latency_ms: every value must be a number >= 0"),
])
def test_bad_emulation_lists_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["topology.clients=2", override])
