"""Typed configuration: YAML file + ``key=value`` overrides, validated once.

``schema`` holds the sections (dataclasses with defaults and help), ``validate`` the rules,
``load`` the parsing; this package re-exports what the rest of the code imports.
"""
from fedsea_hpc.config.load import load_config, parse_overrides, reference_markdown
from fedsea_hpc.config.schema import (
    DEEPSPEED_EXTRA_ALLOWED, DEFAULT_RELATIVE_NOISE, ONE_PROCESS_MODES, PAPER_NOISE_SIGMA, CommConfig, Config,
    ConfigError, DataConfig, DebugConfig, DeepSpeedConfig, EmulateConfig, EvalConfig, FederatedConfig, GenerateConfig,
    ModelConfig, PeftConfig, PrivacyConfig, RunConfig, SplitConfig, TopologyConfig, TrainConfig,
)
from fedsea_hpc.config.validate import check_world_size, shipped_data_files, validate, validate_eval, validate_generate

__all__ = [
    "DEEPSPEED_EXTRA_ALLOWED", "DEFAULT_RELATIVE_NOISE", "ONE_PROCESS_MODES", "PAPER_NOISE_SIGMA", "CommConfig",
    "Config", "ConfigError", "DataConfig", "DebugConfig", "DeepSpeedConfig", "EmulateConfig", "EvalConfig",
    "FederatedConfig", "GenerateConfig", "ModelConfig", "PeftConfig", "PrivacyConfig", "RunConfig",
    "SplitConfig", "TopologyConfig", "TrainConfig", "check_world_size", "load_config", "parse_overrides",
    "reference_markdown", "shipped_data_files", "validate", "validate_eval", "validate_generate",
]
