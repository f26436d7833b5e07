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
