"""Helpers shared by the benchmark scripts: idle-core waiting, foreign-CPU accounting, launching.

The scripts run as ``python benchmarks/<name>.py`` (this directory is then on ``sys.path``), so
they import this module as ``_common``.
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = "models/smollm2-135m-instruct"


def ensure_smollm2() -> None:
    if (REPO / SMOLLM2_DIR / "config.json").is_file():
        return
    print(f"fetching SmolLM2-135M into {SMOLLM2_DIR} ...", flush=True)
    subprocess.run([sys.executable, "-m", "fedsea_hpc", "fetch-model", "smollm2", "--dest", SMOLLM2_DIR],
                   cwd=REPO, check=True)


def mpiexec() -> str:
    """The launcher the sweeps use (the venv's ``mpiexec``, else PATH's; a clear error if none)."""
    from fedsea_hpc.study.sweep import find_mpiexec

    return find_mpiexec()


def split_threads(clients: int, servers: int) -> dict:
    """What ``fedsea_hpc.distributed.process.threads_for`` picks per role when OMP_NUM_THREADS is unset and the job
    shares one node (the same function decides)."""
    from fedsea_hpc.distributed.process import role_threads

    return role_threads(len(os.sched_getaffinity(0)), clients, servers)


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all processes, all cores), from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(max_wait_s: float, busy_frac: float = 0.15, window_s: float = 3.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine is mostly idle; return the busy fraction seen.

    Other jobs on the same cores (tests, other benchmarks) would inflate both modes' times by
    different amounts, so the ratio is only meaningful on a quiet machine.
    """
    ncpu = os.cpu_count() or 1
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = cpu_busy_s()
        time.sleep(window_s)
        frac = (cpu_busy_s() - b0) / (window_s * ncpu)
        if frac <= busy_frac or time.monotonic() >= deadline:
            return frac
        print(f"  machine busy ({frac:.0%} of {ncpu} cores used by others); waiting ...", flush=True)


def run_cmd(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, float, float, float]:
    """Run ``cmd``; return (rc, wall s, CPU s of our process tree, CPU s used by everything else)."""
    busy0, ours0, t0 = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall, ours = time.perf_counter() - t0, children_cpu_s() - ours0
    return rc, wall, ours, max(0.0, cpu_busy_s() - busy0 - ours)


def least_disturbed_run(tag: str, cmd: list[str], env: dict, odir: Path, args, base: dict, finish) -> dict:
    """Run ``cmd`` (outputs under ``odir``) up to ``1 + args.retries`` times; keep the run during
    which other processes used the smallest share of the cores, stopping once that share is at most
    ``args.max_foreign``. ``finish(run, odir)`` adds the mode's own results (and prints them)."""
    ncpu = os.cpu_count() or 1
    best = None
    for attempt in range(1 + args.retries):
        shutil.rmtree(odir, ignore_errors=True)
        odir.mkdir(parents=True)
        quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else float("nan")
        load_before = os.getloadavg()
        print(f"[{tag}] {' '.join(cmd)}", flush=True)
        rc, elapsed, cpu_ours, cpu_foreign = run_cmd(cmd, env, args.timeout, odir / "log.txt")
        if rc != 0:
            raise RuntimeError(f"{tag} exited {rc} after {elapsed:.0f}s; log tail:\n{tail(odir / 'log.txt')}")
        run = {**base, "command": cmd, "omp_num_threads_env": env.get("OMP_NUM_THREADS"),
               "process_wall_s": elapsed, "attempt": attempt, "loadavg_before": load_before,
               "busy_frac_before": quiet, "cpu_s_ours": cpu_ours, "cpu_s_foreign": cpu_foreign,
               "foreign_cpu_frac": cpu_foreign / (elapsed * ncpu)}
        finish(run, odir)
        if best is None or run["foreign_cpu_frac"] < best["foreign_cpu_frac"]:
            best = run
        if run["foreign_cpu_frac"] <= args.max_foreign:
            break
        print(f"  too much foreign load (> {args.max_foreign:.0%}); retrying", flush=True)
    return best


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def machine_info() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
