"""When to move, and to what: the policy between the cost model, the planner and the migration.

Before a step at which a decision is due (``split.rebalance``: once after the warm-up, or every
``split.rebalance_every`` steps after it; or a forced ``debug.partition_schedule`` entry), rank
0 plans from the smoothed costs every rank already holds (:mod:`fedsea_hpc.adapt.costs`), keeps
the plan only if it predicts more than ``split.rebalance_min_gain`` × speed-up
(:func:`~fedsea_hpc.adapt.planner.worth_moving`), and broadcasts one decision; every rank then
migrates together (:mod:`fedsea_hpc.adapt.migrate`). Each change is a record: step, old and new
(p, q) per client, predicted step times, the seconds spent planning and migrating, and, once
``MEASURE_STEPS`` steps have run on the new partition, the measured step time.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from fedsea_hpc.adapt import planner
from fedsea_hpc.config import Config
from fedsea_hpc.distributed.env import say

MEASURE_STEPS = 5  # steps on a new partition averaged into a record's measured step time (after one warm-up)


class Rebalancer:
    """One per rank; only rank 0's plans count (the broadcast makes them everyone's)."""

    def __init__(self, cfg: Config, num_layers: int, placement=None):
        s = cfg.split
        self.mode, self.every, self.warmup, self.min_gain = s.rebalance, s.rebalance_every, s.rebalance_warmup_steps, \
            s.rebalance_min_gain
        self.schedule = {int(t): (int(p), int(q)) for t, p, q in cfg.debug.partition_schedule}
        self.limits = planner.Limits(num_layers, s.min_head_layers, s.min_tail_layers, list(s.client_memory_mb))
        self.train_mode, self.servers, self.clients = cfg.train.mode, cfg.topology.servers, cfg.topology.clients
        self.splits = [tuple(x) for x in cfg.splits()]
        self.placement = tuple(placement if placement is not None  # server index per client (topology.assignment)
                               else planner.round_robin(self.clients, self.servers))
        # balanced placement only changes the predicted (and real) step time in lockstep with >= 2 servers
        self.balanced = cfg.topology.assignment == "balanced"
        self.replace = self.balanced and self.train_mode == "parallel" and self.servers > 1
        self.records: list[dict] = []
        self.step_times: list[tuple[int, float]] = []  # (step, step_time_s) on rank 0

    def due(self, step: int) -> bool:
        """Whether a decision is taken before ``step`` (0-based) runs: the same on every rank."""
        if self.schedule:
            return step in self.schedule
        if self.mode == "once":
            return step == self.warmup
        if self.mode == "every":
            return step >= self.warmup and (step - self.warmup) % self.every == 0
        return False

    def _plan(self, step: int, costs: dict | None) -> tuple[tuple | None, dict]:
        """Rank 0: the new (splits, placement) (None = stay) and what the record says about them."""
        rec: dict = {"step": step, "old": [list(x) for x in self.splits]}
        if self.balanced:
            rec["old_assignment"] = list(self.placement)
        c = _costs(costs) if costs is not None else None
        if step in self.schedule:
            rec["reason"] = "debug.partition_schedule"
            new = [self.schedule[step]] * self.clients
            place = self._place(c, new) if self.replace else self.placement
            if c is not None:
                rec["predicted_old_s"] = self._predict(c, self.splits, self.placement)
                rec["predicted_new_s"] = self._predict(c, new, place)
            return ((new, place) if (new, place) != (self.splits, self.placement) else None), rec
        if c is None:
            rec["reason"] = "no costs measured yet"
            return None, rec
        t_plan = time.perf_counter()
        try:
            plan = planner.plan(c, self.limits, self.splits, servers=self.servers, mode=self.train_mode,
                                assignment="balanced" if self.replace else "round_robin",
                                current_assignment=self.placement)
        except planner.PlanError as e:  # measured activations outgrew a budget: say so, keep the partition
            say(f"fedsea: warning: rebalance before step {step}: {e}; keeping the current partition")
            rec["reason"] = f"no partition fits: {e}"
            return None, rec
        rec["plan_s"] = time.perf_counter() - t_plan
        rec["predicted_old_s"] = self._predict(c, self.splits, self.placement)
        rec["predicted_new_s"] = plan.predicted_s
        new, place = [tuple(x) for x in plan.splits], tuple(plan.assignment)
        if (new, place) == (self.splits, self.placement):
            rec["reason"] = "the current partition is already the best predicted"
            return None, rec
        if not planner.worth_moving(rec["predicted_old_s"], plan.predicted_s, self.min_gain):
            rec["reason"] = f"predicted gain below split.rebalance_min_gain={self.min_gain:g}"
            return None, rec
        rec["reason"] = "planned"
        return (new, place), rec

    def _place(self, c: planner.Costs | None, splits) -> tuple[int, ...]:
        """Balanced placement for forced ``splits``: by measured server work, else by blocks."""
        if c is None:
            return planner.static_placement(splits, self.limits.num_layers, self.servers)
        return planner.assign_balanced([b * (self.limits.num_layers - p - q)
                                        for b, (p, q) in zip(c.server_block_s, splits)], self.servers)

    def _predict(self, c: planner.Costs, splits, placement) -> float:
        return planner.predict(c, self.limits.num_layers, [p + q for p, q in splits], placement, self.servers,
                               self.train_mode)

    def decide(self, step: int, costs: dict | None, rank: int, device: torch.device) -> tuple[tuple | None, dict]:
        """Rank 0 plans; one broadcast gives every rank the same answer: None (stay) or
        (splits, placement), one (p, q) and one server index per client."""
        new, rec = self._plan(step, costs) if rank == 0 else (None, {})
        n = self.clients
        msg = torch.zeros(1 + 3 * n, dtype=torch.int64, device=device)
        if rank == 0 and new is not None:
            msg[0] = 1
            msg[1:] = torch.tensor([v for pq in new[0] for v in pq] + list(new[1]), dtype=torch.int64)
        dist.broadcast(msg, src=0)
        if msg[0].item() == 0:
            return None, rec
        vals = msg[1:].tolist()
        return ([(vals[2 * c], vals[2 * c + 1]) for c in range(n)], tuple(vals[2 * n:])), rec

    def applied(self, rec: dict, new: tuple, migrate_s: float) -> dict:
        """Rank 0, after :meth:`follow`: the record of a change just applied (logged with the next step)."""
        rec = {**rec, "new": [list(x) for x in new[0]], "migrate_s": migrate_s}
        if self.balanced:
            rec["new_assignment"] = list(new[1])
        self.records.append(rec)
        return rec

    def follow(self, new: tuple) -> None:
        """Every rank: the (splits, placement) now in force."""
        self.splits = [tuple(x) for x in new[0]]
        self.placement = tuple(new[1])

    def observe(self, step: int, step_time_s: float) -> dict | None:
        """Rank 0, after each step: returns a measurement once a record's window is complete."""
        self.step_times.append((step, step_time_s))
        for rec in self.records:
            if "measured_new_s" in rec:
                continue
            window = [t for s, t in self.step_times if rec["step"] + 1 <= s < rec["step"] + 1 + MEASURE_STEPS]
            before = [t for s, t in self.step_times if rec["step"] - MEASURE_STEPS <= s < rec["step"]]
            if len(window) == MEASURE_STEPS:
                rec["measured_new_s"] = sum(window) / len(window)
                rec["measured_old_s"] = sum(before) / len(before) if before else None
                return {"step": rec["step"], "measured_old_s": rec["measured_old_s"],
                        "measured_new_s": rec["measured_new_s"]}
        return None

    def finish(self) -> dict:
        """Rank 0: what summary.json gets."""
        for rec in self.records:  # a window cut short by the end of the run: what there is
            if "measured_new_s" not in rec:
                window = [t for s, t in self.step_times if s > rec["step"]][:MEASURE_STEPS]
                rec["measured_new_s"] = sum(window) / len(window) if window else None
        out = {"final_partition": [list(x) for x in self.splits], "rebalances": self.records}
        if self.balanced:
            out["final_assignment"] = list(self.placement)
        return out


def _costs(costs: dict) -> planner.Costs:
    return planner.Costs(costs["client_block_s"], costs["client_fixed_s"], costs["wire_s"], costs["server_block_s"],
                         client_fixed_mb=costs.get("client_fixed_mb", ()), client_block_mb=costs.get("client_block_mb", ()))
