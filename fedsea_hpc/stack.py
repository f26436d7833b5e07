"""The library versions this code is tested with, checked before a job starts.

fedsea-hpc reaches into internals that change between releases: transformers'
``create_causal_mask(cache=...)``, ``DynamicCache.batch_select_indices``,
``config._attn_implementation`` and ``no_init_weights``; peft's module naming
(``base_model.model.``, ``lora_A.default``); DeepSpeed's world-level collectives that
``distributed/deepspeed_glue.py`` confines to the server group. Another version may fail
subtly (wrong masks, a hang in ZeRO-3 set-up), so it is refused with a clear message unless
``FEDSEA_ALLOW_UNTESTED_STACK=1``. The pins agree with ``launch/constraints.txt`` (a test holds
them together).
"""
from __future__ import annotations

import os
from importlib import metadata

from fedsea_hpc.errors import InputError

TESTED = {"transformers": "5.24.0", "peft": "0.21.2", "deepspeed": "0.19.8"}
ALLOW_ENV = "FEDSEA_ALLOW_UNTESTED_STACK"


class StackError(InputError):
    """An installed library version this code was not tested with (exit code 2)."""


def check_stack(versions: dict[str, str] | None = None) -> list[str]:
    """Raise ``StackError`` naming the first mismatch; with ``FEDSEA_ALLOW_UNTESTED_STACK=1``
    return the mismatches as warnings instead. ``versions`` (for tests) replaces what is installed."""
    problems = []
    for name, want in TESTED.items():
        try:
            got = versions[name] if versions is not None else metadata.version(name)
        except (KeyError, metadata.PackageNotFoundError):
            got = None
        if got != want:
            problems.append(f"{name} {got or 'is not installed'}{'' if got is None else ' is installed'}, "
                            f"fedsea-hpc is tested with {name}=={want}")
    if problems and os.environ.get(ALLOW_ENV) != "1":
        raise StackError(f"{problems[0]}; install the pinned stack (launch/setup_venv.sh uses "
                         f"launch/constraints.txt) or set {ALLOW_ENV}=1 to run untested")
    return problems
