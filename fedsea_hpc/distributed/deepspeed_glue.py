"""Keep DeepSpeed's collectives inside the server group.

Even with an ``mpu``, DeepSpeed 0.19.8 issues some collectives on the *world* group: a
``dist.barrier()`` in the ZeRO-3 optimizer set-up, ``assert_ints_same_as_other_ranks`` (a
broadcast from global rank 0) in the ZeRO-3 parameter coordinator, and the checkpoint-tag
``all_reduce``. Client ranks never enter DeepSpeed, so any such call would hang the servers.

The fix lives here and only here: on server ranks, ``deepspeed.comm``'s collectives that are
called without a group are redirected to the server group, and a ``src``/``dst`` of global rank
0 (which is a client) is mapped to the first server rank; ``get_rank()``/``get_world_size()``
without a group answer for the server group, so DeepSpeed's "am I rank 0" tests pick the first
server rank. Calls that name a group are untouched.
"""
from __future__ import annotations

import functools
import inspect

import deepspeed.comm as ds_comm
import torch

DEEPSPEED_VERSION = "0.19.8"  # the behaviour above was checked on this release; see pyproject pin

_COLLECTIVES = ("barrier", "broadcast", "all_reduce", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all_single",
                "broadcast_object_list", "all_gather_object", "monitored_barrier",
                # "rank 0" checks (e.g. ZeRO-3's list agreement test) must see server-group ranks
                "get_rank", "get_world_size")
_ROOT_ARGS = ("src", "dst")


def confine_to_group(group, ranks: list[int]) -> None:
    """Redirect group-less ``deepspeed.comm`` collectives to ``group`` (idempotent).

    Parameters
    ----------
    group : ProcessGroup
        The server group.
    ranks : list of int
        Its global ranks, ascending; ``ranks[0]`` stands in for "global rank 0".
    """
    if getattr(ds_comm, "_fedsea_confined", None) is not None:
        return
    for name in _COLLECTIVES:
        fn = getattr(ds_comm, name, None)
        if fn is not None and hasattr(fn, "__code__"):
            setattr(ds_comm, name, _scoped(fn, group, ranks[0]))
    ds_comm._fedsea_confined = (group, tuple(ranks))


def _signature(fn) -> inspect.Signature:
    """Signature of a ``deepspeed.comm`` op. Its ``timed_op`` wrapper hides it behind
    ``(*args, **kwargs)`` without ``functools.wraps``; the original is in the closure."""
    free = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    return inspect.signature(free.get("func", fn))


def _scoped(fn, group, root: int):
    sig = _signature(fn)
    if "group" not in sig.parameters:
        raise RuntimeError(f"deepspeed.comm.{fn.__name__} has no 'group' parameter; "
                           f"fedsea-hpc supports deepspeed=={DEEPSPEED_VERSION}")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        if "group" in sig.parameters and bound.arguments.get("group") is None:
            bound.arguments["group"] = group
            for key in _ROOT_ARGS:
                if bound.arguments.get(key) == 0:  # global rank 0 is a client: use the first server
                    bound.arguments[key] = root
        return fn(*bound.args, **bound.kwargs)

    return wrapper


# ---------------------------------------------------------------- optimizer state, for migration
# DeepSpeed keeps the fp32 master weights and the optimizer state in flat partitions whose
# attribute names differ by wrapper (checked on 0.19.8); a plain torch optimizer (ZeRO 0 in
# fp32) keeps them per parameter.
_FLAT_PARTITIONS = ("fp32_partitioned_groups_flat",  # ZeRO-3
                    "single_partition_of_fp32_groups",  # ZeRO-1/2
                    "fp32_groups_flat_partition")  # bf16 optimizer (ZeRO 0)


def _inner(opt):
    """The torch optimizer under DeepSpeed's wrapper (or ``opt`` itself)."""
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _state_tensors(opt) -> list:
    """The tensors the torch optimizer keeps state for."""
    for attr in _FLAT_PARTITIONS:
        if hasattr(opt, attr):
            return [t for t in getattr(opt, attr) if t.numel() > 0]
    return [p for g in _inner(opt).param_groups for p in g["params"]]


def full_state(engine, named) -> tuple[dict, float]:
    """Every trainable tensor's full fp32 value and AdamW moments (name → param/exp_avg/
    exp_avg_sq, on CPU) and the optimizer's step counter. Collective over the server group
    under ZeRO 1-3 (each call gathers the shards): every server rank calls it alike."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    inner = _inner(opt)
    out = {}
    for name, p in named:
        full = safe_get_full_fp32_param(p)
        if full is None:  # no partitioning: the torch optimizer holds this very parameter
            st = inner.state.get(p, {})
            out[name] = {"param": p.detach().float().cpu().clone(),
                         **{k: st[k].float().cpu().clone() if k in st else torch.zeros(p.shape)
                            for k in ("exp_avg", "exp_avg_sq")}}
        else:
            out[name] = {"param": full.float().cpu().clone(),
                         **{k: safe_get_full_optimizer_state(p, k).float().cpu().clone()
                            for k in ("exp_avg", "exp_avg_sq")}}
    steps = [float(inner.state[t]["step"]) for t in _state_tensors(opt) if "step" in inner.state.get(t, {})]
    return out, max(steps, default=0.0)


def load_optimizer_state(engine, named, state: dict, step: float) -> None:
    """Write AdamW moments into a freshly built engine (its parameters already hold the values):
    AdamW creates its state lazily at the first step, so it is created here, at ``step``."""
    from deepspeed.utils import safe_set_full_optimizer_state

    opt = engine.optimizer
    inner = _inner(opt)
    for t in _state_tensors(opt):
        inner.state[t] = {"step": torch.tensor(float(step), dtype=torch.float32),
                          "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link the fragments
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        for key in ("exp_avg", "exp_avg_sq"):
            value = state[name][key]
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, value.to(device=p.device, dtype=torch.float32), key)
            else:
                inner.state[p][key].copy_(value.to(inner.state[p][key].dtype))


def save_checkpoint_snapshot(engine, save_dir: str, tag: str, hand_over) -> None:
    """``engine.save_checkpoint(save_dir, tag)`` as DeepSpeed has it (its collectives, file names
    and contents, frozen base weights left out), except that each state dict goes to
    ``hand_over(state_dict, path)`` instead of ``torch.save``: the caller snapshots it and writes
    it in the background (``components.saving.Writer``). Collective over the engine's group."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class HandOver(CheckpointEngine):
        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            hand_over(state_dict, path)

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

        def commit(self, info) -> bool:
            return True

        def preserves_storage_sharing(self) -> bool:
            return False  # the snapshot copies each tensor into storage of its own size

    own = engine.checkpoint_engine
    engine.checkpoint_engine = HandOver()
    try:
        engine.save_checkpoint(save_dir, tag=tag, save_latest=False, exclude_frozen_parameters=True)
    finally:
        engine.checkpoint_engine = own

