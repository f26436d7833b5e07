"""``fedsea sweep``: run every point of a grid through the real entry point, one output dir each.

Layout under ``OUT``::

    sweep.json                      the grid, its points, the machine, the command line
    points/p003/r0/                 one run: the job's own outputs (summary.json, metrics.jsonl,
        run.json                    config.yaml, ...) + this record (status, rc, error, command)
        log.txt                     what the ranks printed

A run is launched like ``launch/local.sh`` does (``mpiexec -n RANKS python -m fedsea_hpc train``;
one rank without mpiexec) or, inside a Slurm allocation, with ``srun --ntasks=RANKS``. A run
that fails is recorded with its exit code and error line and the sweep goes on; a run whose
``run.json`` says done (and whose summary.json is there) is skipped, so re-running a sweep after
a crash or a time limit does only what is missing. ``--point I`` runs one point (a Slurm array
task: ``slurm/sweep.sbatch``); ``--slurm`` submits the array and its collector instead.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedsea_hpc.components.outputs import write_json
from fedsea_hpc.config import ConfigError, load_config
from fedsea_hpc.distributed.env import free_port
from fedsea_hpc.study import grid as grids
from fedsea_hpc.study.machine import machine_info

LAUNCHERS = ("auto", "mpiexec", "srun")


def run_dir(out: str, point: grids.Point, repeat: int) -> Path:
    return Path(out) / "points" / point.name / f"r{repeat}"


def is_done(d: Path) -> bool:
    try:
        rec = json.loads((d / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return rec.get("status") == "done" and (d / "summary.json").is_file()


def ranks_of(grid: grids.Grid, point: grids.Point) -> int:
    """Ranks the point's config needs; a ConfigError is the point's failure, raised here."""
    return load_config(grid.config, point.args()).world_size()


def find_mpiexec() -> str:
    """The ``mpiexec`` beside this Python (the venv's), else the one on PATH."""
    cand = Path(sys.executable).parent / "mpiexec"
    found = str(cand) if cand.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec beside this Python or on PATH (activate the venv: . launch/setup_venv.sh; "
                           "or --launcher srun inside a Slurm allocation)")
    return found


def launcher_for(choice: str) -> str:
    if choice != "auto":
        return choice
    return "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "mpiexec"


def command(grid: grids.Grid, point: grids.Point, ranks: int, out_dir: Path, launcher: str) -> list[str]:
    conf = ["--config", grid.config] if grid.config else []
    job = [sys.executable, "-m", "fedsea_hpc", "train", *conf, *point.args(),
           f"run.output_dir={out_dir}", "run.progress=false"]
    if launcher == "srun":
        return ["srun", f"--ntasks={ranks}", "--kill-on-bad-exit=1", *job]
    if ranks == 1:
        return job
    mpi = find_mpiexec()
    ompi = "open mpi" in subprocess.run([mpi, "--version"], capture_output=True, text=True).stdout.lower()
    return [mpi, *(["--allow-run-as-root", "--oversubscribe"] if ompi else []), "-n", str(ranks), *job]


def error_line(text: str, rc: int) -> str:
    """The line that says why a run failed: the project's ``fedsea: error:`` line if any, else
    the last line naming an error, else the last line printed."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pick in (lambda ln: "fedsea: error:" in ln, lambda ln: "Error" in ln or "error" in ln):
        hits = [ln for ln in lines if pick(ln)]
        if hits:
            return hits[-1][-400:]
    return lines[-1][-400:] if lines else f"exit code {rc}, nothing printed"


def run_point(grid: grids.Grid, point: grids.Point, repeat: int, out: str, launcher: str,
              timeout_s: float) -> dict:
    """Run one repeat of one point (or skip it if done); its ``run.json`` record."""
    d = run_dir(out, point, repeat)
    if is_done(d):
        rec = json.loads((d / "run.json").read_text())
        rec["skipped"] = True
        return rec
    if d.exists():  # a failed or interrupted earlier try: start it afresh
        shutil.rmtree(d)
    d.mkdir(parents=True)
    rec = {"point": point.index, "repeat": repeat, "overrides": point.overrides, "labels": point.labels,
           "launcher": launcher, "started": time.time()}
    try:
        rec["ranks"] = ranks = ranks_of(grid, point)
    except ConfigError as e:
        rec.update(status="failed", rc=2, error=f"fedsea: error: {e}", wall_s=0.0, command=None)
        write_json(str(d / "run.json"), rec)
        return rec
    cmd = command(grid, point, ranks, d, launcher)
    env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    if launcher == "srun":  # every run of an array task gets its own rendezvous port
        env["MASTER_PORT"] = str(free_port())
    else:
        env.pop("MASTER_PORT", None)
    rec["command"] = cmd
    t0 = time.perf_counter()
    with open(d / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s or None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
        except BaseException:  # Ctrl-C or a signal to the sweep: take the point's ranks down too
            os.killpg(proc.pid, signal.SIGTERM)
            raise
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    text = (d / "log.txt").read_text(errors="replace")
    if rc == 0 and (d / "summary.json").is_file():
        rec.update(status="done", rc=0, error=None)
    elif rc is None:
        rec.update(status="failed", rc=None, error=f"timed out after --point-timeout-s {timeout_s:g}")
    else:
        rec.update(status="failed", rc=rc, error=error_line(text, rc) if rc else "exit 0 without summary.json")
    write_json(str(d / "run.json"), rec)
    return rec


def write_manifest(grid: grids.Grid, out: str, argv: list[str]) -> list[grids.Point]:
    points = grid.points()
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "sweep.json"), {
        "grid_file": grid.path, "grid": grid.to_dict(), "repeats": grid.repeats, "command": argv,
        "points": [{"index": p.index, "name": p.name, "overrides": p.overrides, "labels": p.labels} for p in points],
        "machine": machine_info()})
    return points


def sweep(grid: grids.Grid, out: str, *, only: int | None, launcher: str, timeout_s: float,
          argv: list[str]) -> list[dict]:
    """Run the grid's points (or point ``only``) with every repeat; their records."""
    points = write_manifest(grid, out, argv) if only is None else grid.points()
    if only is not None:
        if not 0 <= only < len(points):
            raise grids.GridError(f"--point: {only} is not a point of {grid.path} (0..{len(points) - 1})")
        points = [points[only]]
    launcher = launcher_for(launcher)
    records = []
    for p in points:
        for r in range(grid.repeats):
            rec = run_point(grid, p, r, out, launcher, timeout_s)
            records.append(rec)
            what = "skipped (done)" if rec.get("skipped") else rec["status"]
            line = f"[sweep] {p.name} r{r} {' '.join(p.args()) or '(base)'}: {what}"
            if rec["status"] == "done" and not rec.get("skipped"):
                line += f" in {rec['wall_s']:.1f} s"
            elif rec["status"] == "failed":
                line += f" ({rec['error']})"
            print(line, flush=True)
    return records


def submit_slurm(grid: grids.Grid, out: str, argv: list[str], max_parallel: int, sbatch_args: list[str],
                 timeout_s: float) -> tuple[str, str]:
    """``sbatch`` the grid as a job array (``%max_parallel`` at a time, each task the largest
    point's ranks) and the collector after it (``--dependency=afterok``); the two job ids."""
    if not Path("slurm/sweep.sbatch").is_file():
        raise RuntimeError("--slurm: run from the repository root (slurm/sweep.sbatch is submitted from there, "
                           "as slurm/train.sbatch is)")
    points = write_manifest(grid, out, argv)
    ranks = []
    for p in points:
        try:
            ranks.append(ranks_of(grid, p))
        except ConfigError:
            ranks.append(1)  # it fails in its task and is recorded there
    out_abs = os.path.abspath(out)
    cap = f"%{max_parallel}" if max_parallel > 0 else ""
    extra = ["--repeats", str(grid.repeats)] + (["--point-timeout-s", str(timeout_s)] if timeout_s else [])
    array = subprocess.run(
        ["sbatch", "--parsable", f"--array=0-{len(points) - 1}{cap}", f"--ntasks={max(ranks)}",
         f"--output={out_abs}/slurm-%A_%a.out", *sbatch_args, "slurm/sweep.sbatch",
         "--grid", grid.path, "--out", out_abs, *extra], capture_output=True, text=True)
    if array.returncode != 0:
        raise RuntimeError(f"sbatch slurm/sweep.sbatch: {array.stderr.strip()}")
    array_id = array.stdout.strip().split(";")[0]
    report = subprocess.run(
        ["sbatch", "--parsable", f"--dependency=afterok:{array_id}", "--ntasks=1",
         f"--output={out_abs}/slurm-report-%j.out", *sbatch_args, "slurm/report.sbatch", out_abs],
        capture_output=True, text=True)
    if report.returncode != 0:
        raise RuntimeError(f"sbatch slurm/report.sbatch: {report.stderr.strip()}")
    return array_id, report.stdout.strip().split(";")[0]
