"""Defaults ← YAML file ← ``section.key=value`` overrides, each value type-checked, then validated.

Also renders the README's config reference from the schema's help texts.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fedsea_hpc.config.schema import Config, ConfigError
from fedsea_hpc.config.validate import validate
from fedsea_hpc.errors import one_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
            for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, bool) and (tp is str or (origin is Literal and "off" in typing.get_args(tp))):
        value = "on" if value else "off"  # YAML 1.1 reads off/on/no/yes as booleans: `run.resume=off`
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is list:
        if isinstance(value, str):  # a single file/module given on the command line
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


MOVED = {"privacy.min_head_layers": "split.min_head_layers"}  # old key -> new key


def _apply(cfg: Config, tree: dict, source: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    for section, values in tree.items():
        if not hasattr(cfg, section):
            raise ConfigError(f"{section}: unknown config section; allowed: {', '.join(_sections())}")
        obj = getattr(cfg, section)
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if f"{section}.{key}" in MOVED:
                raise ConfigError(f"{section}.{key}: moved to {MOVED[f'{section}.{key}']}; rename it in {source}")
            if key not in hints:
                raise ConfigError(f"{section}.{key}: unknown config key; allowed in {section}: {', '.join(hints)}")
            setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def flat_keys(tree: dict) -> dict:
    """A config tree ``{section: {key: value}}`` as dotted keys ``{"section.key": value}``; values
    below a section (``deepspeed.extra``'s dict included) are kept whole."""
    return {f"{s}.{k}" if isinstance(sec, dict) else s: v
            for s, sec in tree.items() for k, v in (sec.items() if isinstance(sec, dict) else [(s, sec)])}


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.steps=5", "peft.target_modules=[q_proj]"]`` → nested dict (values parsed as YAML)."""
    tree: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        dotted, raw = pair.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {dotted!r} must look like section.key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        tree.setdefault(parts[0], {})[parts[1]] = value
    return tree


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← overrides, then :func:`validate`. Raises ConfigError."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "no such file"
            raise ConfigError(f"--config {path}: {what}; allowed: a YAML file of config sections")
        try:
            tree = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path}: invalid YAML{at}: {problem}; allowed: a YAML mapping "
                              "of sections, e.g. `train: {steps: 20}`") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: cannot read it ({one_line(e)})") from None
        tree = {} if tree is None else tree
        _apply(cfg, tree, f"--config {path}")
    _apply(cfg, parse_overrides(overrides or []), "overrides")
    validate(cfg)
    return cfg


def reference_markdown() -> str:
    """The config reference table for README (``fedsea config-reference``)."""
    cfg = Config()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for sec in dataclasses.fields(Config):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            rows.append(f"| `{sec.name}.{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {f.metadata['help']} |")
    return "\n".join(rows)
