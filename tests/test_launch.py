"""The launch scripts and README stay true: Slurm script under a stand-in srun, config reference."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, load_metrics, load_summary, subprocess_env, with_free_port
from fedsea_hpc.config import reference_markdown
from fedsea_hpc.distributed.env import detect_launch

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun on one node: start SLURM_NTASKS copies with the variables srun sets.
shift  # --kill-on-bad-exit=1
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_SCONTROL_LOG"
[ "$1" = show ] && echo localhost
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)

    def run(ntasks: int, *args: str, script: str = "train.sbatch", env_extra: dict | None = None,
            popen: bool = False):
        def launch(port: int):
            env = subprocess_env({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": str(ntasks),
                                  "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1]",
                                  "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "1",
                                  "MASTER_PORT": str(port), "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
                                  **(env_extra or {})})
            cmd = ["bash", str(REPO / "slurm" / script), *args]
            if popen:
                return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
            return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

        return launch(free_port()) if popen else with_free_port(launch)

    return run


@pytest.mark.multirank
def test_sbatch_script_runs_the_job_through_srun(fake_slurm, tmp_path):
    proc = fake_slurm(4, "--config", "configs/default.yaml", "train.steps=3", f"run.output_dir={tmp_path / 'out'}",
                      "run.progress=false", "comm.timeout_s=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_summary(tmp_path / "out")["steps"] == 3


@pytest.mark.multirank
def test_sbatch_restarts_a_failed_step_and_a_requeued_job_resumes(fake_slurm, tmp_path):
    """Under the stand-in srun (no real Slurm yet): run.max_restarts=1 retries the step after a
    client is killed at step 3, from the checkpoint at step 2; then the same job "requeued"
    (SLURM_RESTART_COUNT=1, train.steps raised) resumes from its last checkpoint."""
    out = tmp_path / "out"
    base = ["--config", "tests/data/defaults.yaml", "topology.clients=2", "topology.servers=2",
            f"run.output_dir={out}", "run.progress=false", "comm.timeout_s=20", "run.save_every=2"]
    proc = fake_slurm(4, *base, "train.steps=4", "run.max_restarts=1", "debug.fail_rank=1", "debug.fail_step=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restart 1 of 1 from the last checkpoint" in proc.stderr
    assert [r["step"] for r in load_metrics(out)] == [1, 2, 3, 4]
    proc = fake_slurm(4, *base, "train.steps=6", env_extra={"SLURM_RESTART_COUNT": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    assert [r["step"] for r in load_metrics(out)] == list(range(1, 7))


@pytest.mark.multirank
def test_sbatch_requeues_a_job_stopped_by_the_time_limit_signal(fake_slurm, tmp_path):
    """USR1 (what --signal=USR1@120 sends before the time limit) to one rank: the ranks save and
    exit 75, and job.sh asks scontrol to requeue the job (the stand-in records the call)."""
    out = tmp_path / "out"
    proc = fake_slurm(4, "--config", "tests/data/defaults.yaml", "topology.clients=2", "topology.servers=2",
                      "train.steps=200", "emulate.link_latency_ms=[100,100]", f"run.output_dir={out}",
                      "run.progress=false", "comm.timeout_s=20", popen=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        ranks = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank_of(p, out)]
        assert len(ranks) == 4, ranks
        os.kill(int(ranks[0].name), signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "requeueing job 4242" in stderr
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text().splitlines()
    assert len(list((out / "checkpoints").iterdir())) == 1


def _is_rank_of(proc_dir: Path, out: Path) -> bool:
    try:
        argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"run.output_dir={out}".encode() in argv and argv[1:3] == [b"-m", b"fedsea_hpc"]


@pytest.mark.parametrize("script, config, need", [("train.sbatch", "configs/default.yaml", 4),
                                                  ("generate.sbatch", "configs/generate.yaml", 3),
                                                  ("eval.sbatch", "configs/default.yaml", 4)])
def test_sbatch_script_refuses_a_task_count_that_does_not_match(fake_slurm, tmp_path, script, config, need):
    proc = fake_slurm(need + 1, "--config", config, f"run.output_dir={tmp_path / 'out'}", script=script)
    assert proc.returncode == 2
    assert f"needs {need} ranks" in proc.stderr and f"{need + 1} tasks" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, expect", [
    ({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}, ("torchrun", 1, 3, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ("openmpi", 2, 4, 0)),
    ({"PMI_RANK": "3", "PMI_SIZE": "5", "MPI_LOCALRANKID": "3"}, ("pmi", 3, 5, 3)),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}, ("slurm", 7, 8, 3)),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, ("pmi", 0, 2, 0)),
    ({}, ("none", 0, 1, 0)),
])
def test_launcher_variables_in_precedence_order(env, expect):
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expect


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "run `fedsea config-reference` and paste it into README.md"


def test_every_shipped_config_loads():
    from fedsea_hpc.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path.name} must begin with the command that runs it"
        load_config(str(path), [])


EXIT_SCRIPT = """
import sys, time
from pathlib import Path
from mpi4py import MPI
from fedsea_hpc.distributed.process import exit_now
rank = MPI.COMM_WORLD.Get_rank()
MPI.Finalize()
if rank == 1:  # still busy (say, unmapping a large model) when rank 0 has already left
    time.sleep(2)
    Path(sys.argv[1], "done1").write_text("ok")
exit_now(0)
"""


@pytest.mark.multirank
def test_a_finished_rank_leaving_first_does_not_kill_a_slower_one(mpiexec_path, tmp_path):
    """Under Hydra, a rank that skips MPICH's exit hook looks dead: the launcher SIGKILLs the rest."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([str(mpiexec_path), "-n", "2", sys.executable, str(script), str(tmp_path)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "done1").read_text() == "ok"
