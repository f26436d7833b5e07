"""A sweep's grid file: a base config, fixed overrides, and the axes to vary.

```yaml
config: configs/default.yaml     # the base config, as --config takes it
repeats: 2                       # runs per point (fedsea sweep --repeats overrides it)
set:                             # overrides on every point
  train.steps: 8
axes:                            # every combination, first axis slowest
  topology.clients: [2, 4]
  train.mode: [sequential, parallel]
points:                          # optional: listed combinations of keys that move together,
  - {train.mode: centralized}    # each crossed with the axes (none given: one empty point)
```

Every key is a config key (``section.key``). A point is ``set`` ← its ``points`` entry ← its
axis values; :func:`expand` lists them in a fixed order, so a point's index (and
``SLURM_ARRAY_TASK_ID``) names the same point on every machine. A malformed grid is a
:class:`GridError` naming the field; a point whose config is invalid is not: it is recorded as
failed when the sweep reaches it, and the others run.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedsea_hpc.config import ConfigError

FIELDS = ("config", "repeats", "set", "axes", "points")
_KEY = re.compile(r"^[a-z_]+\.[a-z_0-9]+$")


class GridError(ConfigError):
    """A grid file that cannot be read as a sweep (exit 2 before anything runs)."""


@dataclass(frozen=True)
class Point:
    index: int
    overrides: dict            # every override of this point, ``set`` included: key -> value
    labels: dict               # the keys that vary across the grid: key -> value

    @property
    def name(self) -> str:
        """``p003``: the directory under ``OUT/points``."""
        return f"p{self.index:03d}"

    def args(self) -> list[str]:
        """``section.key=value`` overrides for the command line (values as YAML flow)."""
        return [f"{k}={flow(v)}" for k, v in self.overrides.items()]


@dataclass(frozen=True)
class Grid:
    path: str
    config: str | None
    repeats: int
    fixed: dict
    axes: dict = field(default_factory=dict)
    listed: list = field(default_factory=list)

    def points(self) -> list[Point]:
        return expand(self)

    def to_dict(self) -> dict:
        return {"config": self.config, "repeats": self.repeats, "set": self.fixed, "axes": self.axes,
                "points": self.listed}


def flow(value) -> str:
    """A value as ``key=value`` takes it (YAML flow: lists ``[a, b]``, booleans ``true``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _keys(where: str, tree) -> dict:
    if not isinstance(tree, dict):
        raise GridError(f"{where}: expected a mapping of section.key to values, got {tree!r}")
    for k in tree:
        if not isinstance(k, str) or not _KEY.match(k):
            raise GridError(f"{where}: key {k!r} must look like section.key (a config key)")
    return tree


def load(path: str, repeats: int | None = None) -> Grid:
    """Read and check a grid file; ``repeats`` (the command line's) wins over the file's."""
    p = Path(path)
    if not p.is_file():
        raise GridError(f"--grid: no such file {path!r}")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"--grid {path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise GridError(f"--grid {path}: the top level must be a mapping with {', '.join(FIELDS)}")
    unknown = sorted(set(tree) - set(FIELDS))
    if unknown:
        raise GridError(f"--grid {path}: unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
    config = tree.get("config")
    if config is not None and not isinstance(config, str):
        raise GridError(f"--grid {path}: config: expected a config file path, got {config!r}")
    if config is not None and not Path(config).is_file():
        raise GridError(f"--grid {path}: config: no such file {config!r}")
    n = tree.get("repeats", 1) if repeats is None else repeats
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        where = "--repeats" if repeats is not None else f"--grid {path}: repeats"
        raise GridError(f"{where}: expected an integer >= 1, got {n!r}")
    fixed = _keys(f"--grid {path}: set", tree.get("set") or {})
    axes = _keys(f"--grid {path}: axes", tree.get("axes") or {})
    for k, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"--grid {path}: axes.{k}: expected a non-empty list of values, got {values!r}")
    listed = tree.get("points") or []
    if not isinstance(listed, list):
        raise GridError(f"--grid {path}: points: expected a list of mappings, got {listed!r}")
    for i, entry in enumerate(listed):
        _keys(f"--grid {path}: points[{i}]", entry)
        both = sorted(set(entry) & set(axes))
        if both:
            raise GridError(f"--grid {path}: points[{i}]: {both[0]} is also an axis; give it in one place")
    return Grid(path=str(path), config=config, repeats=n, fixed=fixed, axes=axes, listed=listed)


def expand(grid: Grid) -> list[Point]:
    """Every point of the grid, in order: each ``points`` entry (or one empty one) × the axes."""
    listed = grid.listed or [{}]
    varying = [k for entry in listed for k in entry]
    varying = list(dict.fromkeys(varying + list(grid.axes)))
    combos = list(itertools.product(*grid.axes.values())) if grid.axes else [()]
    out = []
    for entry in listed:
        for combo in combos:
            over = {**grid.fixed, **entry, **dict(zip(grid.axes, combo))}
            labels = {k: over.get(k) for k in varying}
            out.append(Point(index=len(out), overrides=over, labels=labels))
    return out
