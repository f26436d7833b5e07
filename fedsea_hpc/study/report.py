"""``fedsea report DIR...``: the runs under one or more sweep dirs as results.csv, results.md, plots.

A *point* is one configuration; its repeats are the runs under ``points/pNNN/r*`` (a sweep dir)
or, for a dir without ``sweep.json``, every dir holding a ``summary.json`` is a point of its own.
Per run, the steps after warm-up (from the third on, as summary.json's mean) give the step time
and tokens/s (tokens of those steps / their time); per point, mean ± sample std over repeats.
``axes`` are the config keys that differ between points (read from each run's config.yaml, so
a key a point left at the base config's value is shown with that value).

Scaling efficiency, for points that differ from another point only in ``topology.clients``:
(tokens/s ÷ tokens/s at the fewest clients) ÷ (clients ÷ fewest clients); 1.0 is perfect weak
scaling (each client brings its own data), blank where the grid has no such group.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import yaml

from fedsea_hpc.components.outputs import write_json, write_text_atomically
from fedsea_hpc.components.phases import PHASES
from fedsea_hpc.config.load import flat_keys
from fedsea_hpc.study.machine import machine_info

CLIENT_SIDE = ("client_compute_s", "wait_server_s", "sync_s", "optim_s", "emulated_compute_s", "emulated_link_s")
SERVER_SIDE = ("server_compute_s", "wait_clients_s", "optim_s")
WARMUP = 2
MiB = 2**20


def _runs_of(d: Path) -> list[tuple[str, list[Path], list[dict]]]:
    """(point name, its run dirs, their run.json records) under one dir."""
    if (d / "sweep.json").is_file():
        out = []
        for p in sorted((d / "points").glob("p[0-9]*")) if (d / "points").is_dir() else []:
            runs = sorted(r for r in p.glob("r[0-9]*") if r.is_dir())
            recs = []
            for r in runs:
                try:
                    recs.append(json.loads((r / "run.json").read_text()))
                except (OSError, ValueError):
                    recs.append({"status": "incomplete", "error": "no run.json (interrupted)"})
            out.append((f"{d.name}/{p.name}", runs, recs))
        return out
    found = sorted({s.parent for s in d.rglob("summary.json")})
    return [(str(r.relative_to(d.parent)), [r], [{"status": "done"}]) for r in found]


def run_stats(r: Path) -> dict:
    """One finished run: step time, tokens/s, bytes per step, phase means, memory, labels."""
    summary = json.loads((r / "summary.json").read_text())
    rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [x for x in rows if "eval_loss" not in x]  # the optimizer steps' rows, not the eval passes'
    steady = rows[min(WARMUP, len(rows) - 1):]
    t = sum(x["step_time_s"] for x in steady)
    out = {
        "step_time_s": t / len(steady),
        "tokens_per_s": sum(x["tokens"] for x in steady) / t if t > 0 else float("nan"),
        "bytes_per_step": sum(x["bytes_sent"] for x in rows) / len(rows),
        "final_loss": summary["final_loss"],
        "eval_loss": summary.get("eval_loss", float("nan")),
        "phases": {p: statistics.fmean(x.get("phase_s", {}).get(p, 0.0) for x in steady) for p in PHASES},
        "memory": summary.get("memory", {}),
        "emulated": bool(summary.get("emulated")),
        "mode": summary.get("mode"),
    }
    cfg = r / "config.yaml"
    out["config"] = flat_keys(yaml.safe_load(cfg.read_text()) or {}) if cfg.is_file() else {}
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(dirs: list[Path], project: dict | None = None) -> list[dict]:
    """One row per point, in sweep order. ``project``: also replay each run's trace for one
    device per rank (:mod:`fedsea_hpc.study.project`; keys ``latency_us``, ``gbps``)."""
    rows = []
    for d in dirs:
        for name, runs, recs in _runs_of(d):
            done = [r for r, rec in zip(runs, recs) if rec.get("status") == "done" and (r / "summary.json").is_file()]
            failed = [rec for rec in recs if rec.get("status") != "done"]
            row = {"point": name, "runs": len(recs), "done": len(done),
                   "status": "done" if done and not failed else ("failed" if not done else "partly failed"),
                   "error": failed[0].get("error") if failed else None,
                   "ranks": next((rec.get("ranks") for rec in recs if rec.get("ranks")), None),
                   "overrides": next((rec.get("overrides") for rec in recs if rec.get("overrides")), {}),
                   "command": next((rec.get("command") for rec in recs if rec.get("command")), None)}
            stats = [run_stats(r) for r in done]
            if stats:
                row["config"] = stats[0]["config"]
                for key in ("step_time_s", "tokens_per_s"):
                    row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([s[key] for s in stats])
                row["bytes_per_step"] = statistics.fmean(s["bytes_per_step"] for s in stats)
                row["final_loss"] = statistics.fmean(s["final_loss"] for s in stats)
                row["eval_loss"] = _mean_std([s["eval_loss"] for s in stats])[0]  # nan: no eval set
                row["phases"] = {p: statistics.fmean(s["phases"][p] for s in stats) for p in PHASES}
                row["memory"] = _peak_memory([s["memory"] for s in stats])
                row["emulated"] = any(s["emulated"] for s in stats)
                if project is not None:
                    _project(row, done, project)
            else:
                row["config"] = {k: v for k, v in row["overrides"].items()}
            rows.append(row)
    _fill_axes(rows)
    _efficiency(rows)
    return rows


def _project(row: dict, runs: list[Path], link: dict) -> None:
    """``projected_step_s_mean/std`` (PROJECTION) over the point's traced runs; a run that
    could not be projected is named, with why, in ``projection_note``."""
    from fedsea_hpc.study.project import ProjectionError, project_run

    values, missing = [], []
    for r in runs:
        if not (r / "trace.json").is_file():
            missing.append(f"{r.name} (no trace.json: run it with run.trace=true)")
            continue
        try:
            values.append(project_run(r, link.get("latency_us"), link.get("gbps"))["projected_mean_step_s"])
        except ProjectionError as e:
            missing.append(f"{r.name} ({e})")
    if values:
        row["projected_step_s_mean"], row["projected_step_s_std"] = _mean_std(values)
    if missing:
        row["projection_note"] = "not projected: " + ", ".join(missing)


def _peak_memory(mems: list[dict]) -> dict:
    """Per role, the largest peak (bytes) over the repeats."""
    roles = {k for m in mems for k in m.get("peak_bytes", {})}
    return {role: max(m["peak_bytes"].get(role, 0) for m in mems) for role in sorted(roles)}


IGNORED = ("run.output_dir", "run.progress")


def _fill_axes(rows: list[dict]) -> None:
    """``axes``: the keys whose value differs between points: the sweeps' override keys (a point
    that left one out shows its config's value); for plain run dirs, every differing config key."""
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    if not keys:
        keys = sorted({k for r in rows for k in r["config"]})
    axes = [k for k in keys if k not in IGNORED
            and len({json.dumps(r["config"].get(k, r["overrides"].get(k)), sort_keys=True) for r in rows}) > 1]
    for r in rows:
        r["axes"] = {k: r["config"].get(k, r["overrides"].get(k)) for k in axes}


def _efficiency(rows: list[dict]) -> None:
    key = "topology.clients"
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if key in r["axes"] and r.get("tokens_per_s_mean") is not None:
            rest = json.dumps({k: v for k, v in r["axes"].items() if k != key}, sort_keys=True)
            groups.setdefault(rest, []).append(r)
    for members in groups.values():
        if len(members) < 2:
            continue
        base = min(members, key=lambda r: r["axes"][key])
        for r in members:
            if base["tokens_per_s_mean"] > 0:
                r["efficiency"] = (r["tokens_per_s_mean"] / base["tokens_per_s_mean"]) / (r["axes"][key] / base["axes"][key])


def _fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def csv_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    axes = list(dict.fromkeys(k for r in rows for k in r["axes"]))
    roles = sorted({k for r in rows for k in r.get("memory", {})})
    head = (["point", "status", *axes, "ranks", "repeats_done", "step_time_s_mean", "step_time_s_std",
             "tokens_per_s_mean", "tokens_per_s_std", "bytes_per_step", *[f"phase_{p}" for p in PHASES],
             *[f"peak_mem_{role}_bytes" for role in roles], "efficiency", "final_loss", "eval_loss", "emulated",
             "error", "projected_step_s_mean", "projected_step_s_std"])
    body = []
    for r in rows:
        body.append([r["point"], r["status"], *[r["axes"].get(a) for a in axes], r["ranks"], r["done"],
                     r.get("step_time_s_mean"), r.get("step_time_s_std"), r.get("tokens_per_s_mean"),
                     r.get("tokens_per_s_std"), r.get("bytes_per_step"),
                     *[r.get("phases", {}).get(p) for p in PHASES],
                     *[r.get("memory", {}).get(role) for role in roles], r.get("efficiency"), r.get("final_loss"),
                     r.get("eval_loss"), r.get("emulated", False), r.get("error"), r.get("projected_step_s_mean"),
                     r.get("projected_step_s_std")])
    return head, body


def markdown(rows: list[dict], machine: dict, commands: list[list[str]]) -> str:
    axes = list(dict.fromkeys(k for r in rows for k in r["axes"]))
    roles = sorted({k for r in rows for k in r.get("memory", {})})
    cpus = machine.get("cpus") or 0
    projected = any(r.get("projected_step_s_mean") is not None for r in rows)
    lines = ["| point | " + " | ".join(f"`{a}`" for a in axes) + " | ranks | step s (mean ± std) | "
             + ("PROJECTED step s, one device per rank | " if projected else "") + "tokens/s | "
             "MiB/step | " + " | ".join(f"peak {r} MiB" for r in roles) + " | efficiency | status |",
             "|" + "---|" * (len(axes) + 7 + len(roles) + projected)]
    for r in rows:
        step = (f"{r['step_time_s_mean']:.3f} ± {r['step_time_s_std']:.3f}" if r.get("step_time_s_mean") is not None
                else "")
        tps = (f"{r['tokens_per_s_mean']:.0f} ± {r['tokens_per_s_std']:.0f}" if r.get("tokens_per_s_mean") is not None
               else "")
        label = r["status"] + (" (EMULATED)" if r.get("emulated") else "")
        if r["ranks"] and cpus and r["ranks"] > cpus:
            label += f" (oversubscribed: {r['ranks']} ranks on {cpus} cores)"
        lines.append(f"| {r['point']} | " + " | ".join(_fmt(r["axes"].get(a), "g") for a in axes)
                     + f" | {_fmt(r['ranks'], 'd')} | {step} | "
                     + (f"{_fmt(r.get('projected_step_s_mean'))} | " if projected else "") + f"{tps} | "
                     + _fmt(r["bytes_per_step"] / MiB if r.get("bytes_per_step") is not None else None, ".2f")
                     + " | " + " | ".join(_fmt(r["memory"].get(role, 0) / MiB, ".0f") if r.get("memory") else ""
                                          for role in roles)
                     + f" | {_fmt(r.get('efficiency'), '.2f')} | {label} |")
    errors = [f"- {r['point']}: {r['error']}" for r in rows if r.get("error")]
    notes = [f"- {r['point']}: {r['projection_note']}" for r in rows if r.get("projection_note")]
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    out = ["# Results", "",
           f"Measured on {machine.get('host')}: {machine.get('cpus')} CPUs, {machine.get('memory_gib')} GiB, "
           f"{machine.get('platform')}; Python {machine.get('python')}; {libs}; commit {machine.get('commit')}.",
           "Step time and tokens/s: steps after the first two (warm-up); mean ± std over repeats. "
           "Ranks share the machine's cores: more ranks than cores is oversubscribed, not what one device "
           "per rank would give.", "", *lines]
    if projected or notes:
        out += ["", "PROJECTED: a replay of each traced run's steps with one device per rank (fedsea report "
                "--project; fedsea_hpc/study/project.py, link model in each run's projection.json), not a "
                "measurement.", *notes]
    if errors:
        out += ["", "## Failed runs", "", *errors]
    if commands:
        out += ["", "## Commands", "", *[f"    {' '.join(c)}" for c in commands]]
    return "\n".join(out) + "\n"


def _save(fig, ax, path: Path, ylabel: str, title: str) -> str:
    """Label, write and close one figure; its file name."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def plots(rows: list[dict], out: Path) -> list[str]:
    """throughput vs clients per other-axes group; stacked phases per point; memory per role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = [r for r in rows if r.get("tokens_per_s_mean") is not None]
    if not ok:
        return made
    key = "topology.clients"
    if any(key in r["axes"] for r in ok):
        fig, ax = plt.subplots(figsize=(6, 4))
        groups: dict[str, list[dict]] = {}
        for r in ok:
            rest = ", ".join(f"{k}={v}" for k, v in r["axes"].items() if k != key) or "all"
            groups.setdefault(rest, []).append(r)
        for label, members in groups.items():
            members.sort(key=lambda r: r["axes"].get(key) or 0)
            ax.errorbar([r["axes"].get(key) for r in members], [r["tokens_per_s_mean"] for r in members],
                        yerr=[r["tokens_per_s_std"] for r in members], marker="o", capsize=3, label=label)
        ax.set_xticks(sorted({r["axes"][key] for r in ok if r["axes"].get(key) is not None}))
        ax.set_xlabel("clients")
        made.append(_save(fig, ax, out / "throughput_vs_clients.png", "tokens/s (after warm-up)",
                          "Throughput vs clients"))
    # Phases are each the max over ranks, and a client's wait is a server's compute: stacking
    # them all would count the same seconds twice. One bar per side, the step time marked.
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok)), 4))
    colors = dict(zip(PHASES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    labelled = set()
    for side, phases, dx in (("client", CLIENT_SIDE, -0.2), ("server", SERVER_SIDE, 0.2)):
        bottom = [0.0] * len(ok)
        for p in phases:
            vals = [r["phases"][p] for r in ok]
            if any(vals):
                ax.bar([x + dx for x in range(len(ok))], vals, width=0.38, bottom=bottom, color=colors[p],
                       label=None if p in labelled else p.removesuffix("_s"))
                labelled.add(p)
                bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(range(len(ok)), [r["step_time_s_mean"] for r in ok], marker="_", s=400, color="black",
               label="step time", zorder=3)
    ax.set_xticks(range(len(ok)), [r["point"].rsplit("/", 1)[-1] for r in ok], rotation=45, fontsize=7)
    made.append(_save(fig, ax, out / "phases.png", "seconds per step (each phase: max over ranks)",
                      "Per-phase time per point (left bar: clients, right: servers)"))
    roles = sorted({k for r in ok for k in r.get("memory", {})})
    if roles:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        width = 0.8 / len(roles)
        for i, role in enumerate(roles):
            ax.bar([x + i * width for x in range(len(ok))], [r["memory"].get(role, 0) / MiB for r in ok],
                   width=width, label=role)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(ok))], [r["point"].rsplit("/", 1)[-1] for r in ok],
                      rotation=45, fontsize=7)
        made.append(_save(fig, ax, out / "memory.png", "peak MiB per rank", "Peak memory per role"))
    return made


def report(dirs: list[str], out: str | None = None, project: dict | None = None) -> dict:
    """Write results.csv, results.md, results.json and the plots into ``out`` (default: the first
    dir); with ``project`` (``{"latency_us": .., "gbps": ..}``, either None) a PROJECTION per
    traced run too (``projection.json`` beside its trace, a column of the tables)."""
    paths = [Path(d) for d in dirs]
    for p in paths:
        if not p.is_dir():
            from fedsea_hpc.study.grid import GridError

            raise GridError(f"report: no such directory {str(p)!r}")
    dest = Path(out) if out else paths[0]
    dest.mkdir(parents=True, exist_ok=True)
    rows = collect(paths, project)
    machine, commands = machine_info(), []
    for p in paths:
        if (p / "sweep.json").is_file():
            sw = json.loads((p / "sweep.json").read_text())
            machine = sw.get("machine", machine)
            commands.append(sw.get("command", []))
    head, body = csv_rows(rows)
    tmp = dest / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows([["" if v is None else v for v in row] for row in body])
    tmp.replace(dest / "results.csv")
    write_text_atomically(str(dest / "results.md"), markdown(rows, machine, commands))
    made = plots(rows, dest)
    result = {"machine": machine, "commands": commands, "points": rows, "plots": made}
    write_json(str(dest / "results.json"), result)
    return result
