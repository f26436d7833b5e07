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
