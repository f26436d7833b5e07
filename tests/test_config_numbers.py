"""Numbers in overrides and YAML files: float fields take the usual spellings, exponents included."""
from __future__ import annotations

import pytest

from fedsea_hpc.config import load_config


@pytest.mark.parametrize("text,value", [("0.001", 1e-3), ("1e-3", 1e-3), ("3E-4", 3e-4), ("2e-5", 2e-5),
                                        ("1.5e-3", 1.5e-3), ("1", 1.0)])
def test_float_override_accepts_exponent_notation(text, value):
    # PyYAML (YAML 1.1) reads "1e-3" as a *string*; learning rates are almost always written so.
    cfg = load_config(None, [f"train.lr={text}"])
    assert cfg.train.lr == pytest.approx(value)


def test_float_in_yaml_file_accepts_exponent_notation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\nprivacy:\n  noise_std: 2.5e-2\n")
    cfg = load_config(str(f))
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.privacy.noise_std == pytest.approx(0.025)


@pytest.mark.parametrize("extra, match", [
    ("{gradient_clipping: 1.0}", "'gradient_clipping' is not allowed .*optimisation problem"),
    ("{gradient_accumulation_steps: 4}", "'gradient_accumulation_steps' is not allowed"),
    ("{bf16: {enabled: true}}", "'bf16' is not allowed .*model.dtype"),
    ("{optimizer: {type: SGD}}", "'optimizer' is not allowed"),
    ("{train_batch_sz: 1}", "unknown key 'train_batch_sz'; allowed: zero_optimization"),
    ("{zero_optimization: {stage: 3}}", "zero_optimization.stage: set deepspeed.zero_stage"),
    ("{zero_optimization: 3}", "expected a mapping"),
])
def test_deepspeed_extra_refuses_keys_that_break_the_contract(extra, match):
    from fedsea_hpc.config import ConfigError

    with pytest.raises(ConfigError, match=f"^deepspeed\\.extra.*{match}"):
        load_config(None, [f"deepspeed.extra={extra}"])


def test_deepspeed_extra_tuning_keys_merge_without_touching_the_contract():
    import torch

    from fedsea_hpc.components.engine import deepspeed_config

    cfg = load_config(None, ["deepspeed.zero_stage=3",
                             "deepspeed.extra={zero_optimization: {overlap_comm: true}, wall_clock_breakdown: true}"])
    conf = deepspeed_config(cfg.deepspeed, torch.float32)
    assert conf["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert conf["wall_clock_breakdown"] is True and conf["gradient_clipping"] == 0.0
