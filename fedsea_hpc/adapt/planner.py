"""Choose every client's split point (p_c, q_c) from measured costs: pure arithmetic.

No torch.distributed, no DeepSpeed, no torch: the engine measures (see the cost model), calls
:func:`plan` on one rank and broadcasts the answer. Every block of a Llama is the same shape, so
a client's compute grows linearly with the blocks it keeps, k_c = p_c + q_c, and the server's
with the blocks it runs for that client, L - k_c. Per step, for client c:

* ``client_block_s[c]``: seconds one client block costs (forward + backward, this client's rows)
* ``client_fixed_s[c]``: seconds that do not depend on the split (embedding, head, loss, optimizer)
* ``wire_s[c]``: seconds on the wire (four crossings: h_A, h_B, their two gradients)
* ``server_block_s[c]``: seconds one server block costs for this client's rows

Predicted step time of a partition k (client c on server rank ``assignment[c]``):

* ``parallel`` (lockstep client-batch): ``max_c (fixed_c + wire_c + client_block_c · k_c)
  + max_s Σ_{c on s} server_block_c · (L - k_c)``: the slowest client's A and C phases, plus the
  busiest server rank's work on all the rows it serves (both passes).
* ``sequential`` (one client at a time): ``Σ_c (fixed_c + wire_c + client_block_c · k_c +
  server_block_c · (L - k_c))``.

The parallel minimum is found exactly by a threshold sweep: for a bound τ on the client term,
every client takes the largest feasible k whose client term is ≤ τ (more client blocks only
lower server work); the optimum's own τ is among the C·L candidate values, so trying them all
is exact, in O((C·L)²). Sequential is separable: each client takes its own best k. Among
partitions with the same predicted time the one closest to the current partition wins, so
equal costs never move a block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

MODES = ("parallel", "sequential")
ASSIGNMENTS = ("round_robin", "balanced")
REL_TOL = 1e-9  # two predicted times within this are a tie


class PlanError(ValueError):
    """No partition satisfies the floors and memory budgets (the message names the client)."""


@dataclass(frozen=True)
class Costs:
    """Per-step costs of each client, as the module docstring defines them (seconds, MiB)."""

    client_block_s: Sequence[float]
    client_fixed_s: Sequence[float]
    wire_s: Sequence[float]
    server_block_s: Sequence[float]
    client_fixed_mb: Sequence[float] = ()  # memory a client needs whatever its split (0 if empty)
    client_block_mb: Sequence[float] = ()  # memory one more client block costs (0 if empty)

    @property
    def clients(self) -> int:
        return len(self.client_block_s)

    def arrays(self) -> dict[str, np.ndarray]:
        n = self.clients
        out = {k: np.asarray(getattr(self, k), dtype=np.float64)
               for k in ("client_block_s", "client_fixed_s", "wire_s", "server_block_s")}
        for k in ("client_fixed_mb", "client_block_mb"):
            v = getattr(self, k)
            out[k] = np.zeros(n) if len(v) == 0 else np.asarray(v, dtype=np.float64)
        for k, v in out.items():
            if v.shape != (n,):
                raise ValueError(f"Costs.{k}: one value per client ({n}), got {v.shape[0] if v.ndim else v}")
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"Costs.{k}: values must be finite and >= 0, got {v.tolist()}")
        return out


@dataclass(frozen=True)
class Limits:
    """What a plan must respect: L blocks, privacy floors, optional memory budgets (MiB)."""

    num_layers: int
    min_head_layers: int = 1
    min_tail_layers: int = 1
    client_memory_mb: Sequence[float | None] = ()  # one budget (or None) per client; empty = none

    def k_range(self) -> tuple[int, int]:
        """Smallest and largest k = p + q any client may keep (the server keeps >= 1 block)."""
        return self.min_head_layers + self.min_tail_layers, self.num_layers - 1


@dataclass(frozen=True)
class Plan:
    splits: tuple[tuple[int, int], ...]  # (p_c, q_c) per client
    assignment: tuple[int, ...]  # server rank index (0-based within the server group) per client
    predicted_s: float
    evaluated: int = field(default=0, compare=False)  # candidate partitions scored (for the log)


def predict(costs: Costs, num_layers: int, ks: Sequence[int], assignment: Sequence[int], servers: int,
            mode: str) -> float:
    """Predicted step time (seconds) when client c keeps ``ks[c]`` blocks."""
    return _predict(costs.arrays(), num_layers, ks, assignment, servers, mode)


def _predict(a: dict[str, np.ndarray], num_layers: int, ks, assignment, servers: int, mode: str) -> float:
    k = np.asarray(ks, dtype=np.float64)
    client = a["client_fixed_s"] + a["wire_s"] + a["client_block_s"] * k
    server = a["server_block_s"] * (num_layers - k)
    if mode == "sequential":
        return float(np.sum(client + server))
    if mode != "parallel":
        raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    loads = np.bincount(np.asarray(assignment), weights=server, minlength=servers)
    return float(client.max() + loads.max())


def feasible_ks(costs: Costs, limits: Limits) -> list[np.ndarray]:
    """Per client, the k values its floors and memory budget allow (ascending); PlanError if none."""
    return _feasible(costs.arrays(), costs.clients, limits)


def _feasible(a: dict[str, np.ndarray], clients: int, limits: Limits) -> list[np.ndarray]:
    lo, hi = limits.k_range()
    if lo > hi:
        raise PlanError(f"split.min_head_layers + split.min_tail_layers = {lo} leaves no block for the server "
                        f"(L = {limits.num_layers}); must be <= {limits.num_layers - 1}")
    budgets = list(limits.client_memory_mb) or [None] * clients
    if len(budgets) != clients:
        raise PlanError(f"split.client_memory_mb: one budget per client ({clients}), got {len(budgets)}")
    out = []
    for c in range(clients):
        ks = np.arange(lo, hi + 1)
        if budgets[c] is not None:
            need = a["client_fixed_mb"][c] + a["client_block_mb"][c] * ks
            ks = ks[need <= budgets[c]]
            if ks.size == 0:
                least = a["client_fixed_mb"][c] + a["client_block_mb"][c] * lo
                raise PlanError(f"split.client_memory_mb: client {c}'s budget {budgets[c]:g} MiB is below the "
                                f"{least:.1f} MiB that even its smallest split (p + q = {lo}) needs")
        out.append(ks)
    return out


def split_k(k: int, current: tuple[int, int], limits: Limits) -> tuple[int, int]:
    """(p, q) with p + q = k, both floors met, p as close to the current p as possible."""
    p0, _ = current
    p = min(max(p0, limits.min_head_layers), k - limits.min_tail_layers)
    return p, k - p


def _best_ks(a: dict[str, np.ndarray], limits: Limits, assignment: Sequence[int], servers: int, mode: str,
             current: Sequence[int]) -> tuple[np.ndarray, float, int]:
    allowed = _feasible(a, len(current), limits)
    L = limits.num_layers
    cur = np.asarray(current)
    if mode == "sequential":
        ks = []
        for c, opts in enumerate(allowed):
            t = (a["client_block_s"][c] - a["server_block_s"][c]) * opts
            best = t.min()
            ties = opts[t <= best + REL_TOL * max(abs(best), 1e-12)]
            ks.append(ties[np.argmin(np.abs(ties - cur[c]))])
        ks = np.asarray(ks)
        return ks, _predict(a, L, ks, assignment, servers, mode), sum(len(o) for o in allowed)

    if mode != "parallel":
        raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    base = a["client_fixed_s"] + a["wire_s"]
    client_term = [base[c] + a["client_block_s"][c] * opts for c, opts in enumerate(allowed)]
    taus = np.unique(np.concatenate(client_term))
    floor = max(t.min() for t in client_term)  # below this some client has no k at all
    best_ks, best_t, evaluated = None, np.inf, 0
    for tau in taus[taus >= floor]:
        ks = np.array([opts[np.nonzero(t <= tau)[0][-1]] for opts, t in zip(allowed, client_term)])
        t = _predict(a, L, ks, assignment, servers, mode)
        evaluated += 1
        if t < best_t * (1 - REL_TOL) or (t <= best_t * (1 + REL_TOL) and
                                          np.abs(ks - cur).sum() < np.abs(best_ks - cur).sum()):
            best_ks, best_t = ks, min(t, best_t)
    # Pull each client toward its current k while the predicted time stays optimal.
    ks = best_ks.copy()
    for c, opts in enumerate(allowed):
        for k in sorted(opts, key=lambda v: (abs(v - cur[c]), -v)):
            if k == ks[c]:
                break
            trial = ks.copy()
            trial[c] = k
            if _predict(a, L, trial, assignment, servers, mode) <= best_t * (1 + REL_TOL):
                ks = trial
                break
    return ks, _predict(a, L, ks, assignment, servers, mode), evaluated


def assign_balanced(work: Sequence[float], servers: int) -> tuple[int, ...]:
    """Longest-processing-time-first: the heaviest client goes to the least loaded server rank."""
    loads = [0.0] * servers
    out = [0] * len(work)
    for c in sorted(range(len(work)), key=lambda c: (-work[c], c)):
        s = min(range(servers), key=lambda s: (loads[s], s))
        out[c] = s
        loads[s] += work[c]
    return tuple(out)


def static_placement(splits: Sequence[tuple[int, int]], num_layers: int, servers: int) -> tuple[int, ...]:
    """``topology.assignment=balanced`` before anything is measured: equal rows per client, so a
    client's server work is its server blocks, L - p - q."""
    return assign_balanced([num_layers - p - q for p, q in splits], servers)


def round_robin(clients: int, servers: int) -> tuple[int, ...]:
    return tuple(c % servers for c in range(clients))


def plan(costs: Costs, limits: Limits, current: Sequence[tuple[int, int]], *, servers: int = 1,
         mode: str = "parallel", assignment: str = "round_robin",
         current_assignment: Sequence[int] | None = None) -> Plan:
    """The partition (and, for ``assignment='balanced'``, the client → server placement) with the
    smallest predicted step time; ties keep the current partition. Raises :class:`PlanError` when
    floors or budgets admit no partition."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment: must be one of {', '.join(ASSIGNMENTS)}, got {assignment!r}")
    if len(current) != costs.clients:
        raise ValueError(f"current: one (p, q) per client ({costs.clients}), got {len(current)}")
    cur_k = [p + q for p, q in current]
    place = tuple(current_assignment) if current_assignment is not None else round_robin(costs.clients, servers)
    a = costs.arrays()
    ks, t, evaluated = _best_ks(a, limits, place, servers, mode, cur_k)
    if assignment == "balanced" and mode == "parallel" and servers > 1:
        # Alternate: place clients by their server work under the current k, re-plan k; keep the best.
        server_block = a["server_block_s"]
        seen = {place}
        for _ in range(8):
            nxt = assign_balanced(list(server_block * (limits.num_layers - ks)), servers)
            if nxt in seen:
                break
            seen.add(nxt)
            ks2, t2, n2 = _best_ks(a, limits, nxt, servers, mode, cur_k)
            evaluated += n2
            if t2 < t * (1 - REL_TOL):
                ks, t, place = ks2, t2, nxt
    splits = tuple(split_k(int(k), cur, limits) for k, cur in zip(ks, current))
    return Plan(splits, place, t, evaluated)


def worth_moving(current_s: float, planned_s: float, min_gain: float) -> bool:
    """Move only when the plan predicts a speed-up of more than ``min_gain`` (e.g. 1.25x)."""
    return planned_s > 0 and current_s / planned_s > min_gain
