"""slurm/*.sbatch on a real one-node Slurm cluster (launch/slurm-local.sh).

The session fixture uses the private cluster when it is up (``.ci/run`` brings it up), brings it
up for the session otherwise (and down after), and skips with the reason when it cannot (not
root and Slurm not installed). ``FEDSEA_REQUIRE_SLURM=1`` (CI) turns that skip into a failure.
Each test submits with ``sbatch`` from the repository, as a user would, and waits for the job.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, load_summary
from fedsea_hpc.components import checkpoint
from test_generate import hf_reference, read_generations

pytestmark = [pytest.mark.slurm, pytest.mark.multirank]
SCRIPT = REPO / "launch" / "slurm-local.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}
# the default job (3 clients + 1 server, tiny random Llama), short; one thread per rank on 2 cores
TRAIN = ["--config", "configs/default.yaml", "train.steps=6", "privacy.noise_seed=0",
         "comm.timeout_s=30", "comm.max_wait_s=300"]


class Cluster:
    def __init__(self, conf: str):
        self.env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_ADDR", "MASTER_PORT")}
        self.env.update(SLURM_CONF=conf, PYTHONWARNINGS="ignore")

    def cmd(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def submit(self, script: str, log: Path, options: list[str], args: list[str]) -> str:
        """``sbatch [options] slurm/SCRIPT [args]`` from the repository; the job id."""
        out = self.cmd("sbatch", "--parsable", f"--output={log}", "--cpus-per-task=1", *options,
                       f"slurm/{script}", *args)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        line = self.cmd("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, log: Path, until=DONE, timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in until:
                return info
            time.sleep(1)
        self.cmd("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s; log:\n{_tail(log)}")


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _metrics_rows(out: Path) -> int:
    f = out / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _ranks_of(out: Path) -> list[int]:
    """pids of processes whose command line names this job's output dir (its ranks)."""
    p = subprocess.run(["pgrep", "-f", f"run.output_dir={out}"], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


@pytest.fixture(scope="session")
def slurm():
    conf = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True).stdout.split("=", 1)[1]
    started = False
    if subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode != 0:
        up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            reason = f"no local Slurm cluster: {up.stderr.strip().splitlines()[-1] if up.stderr.strip() else up.returncode}"
            if os.environ.get("FEDSEA_REQUIRE_SLURM") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
        started = True
    yield Cluster(conf.strip())
    if started:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True)


@pytest.fixture(scope="module")
def straight(slurm, tmp_path_factory):
    """``sbatch --ntasks=4 slurm/train.sbatch --config configs/default.yaml``, shortened: its log,
    output dir and final job record (shared by the tests that compare with it)."""
    d = tmp_path_factory.mktemp("slurm-train")
    log, out = d / "job.out", d / "out"
    job = slurm.submit("train.sbatch", log, ["--ntasks=4"], [*TRAIN, f"run.output_dir={out}"])
    return log, out, slurm.wait(job, log)


def test_train_sbatch_completes_and_the_progress_bar_starts_after_set_up(straight):
    log, out, info = straight
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    s = load_summary(out)
    assert s["steps"] == 6 and len(s["losses"]) == 6
    for part in ("client0", "client1", "client2", "server"):
        assert (out / "adapters" / part).is_dir(), part
    text = log.read_text(errors="replace")
    assert s["setup_s"] > 0 and f"set-up {s['setup_s']:.1f} s" in text
    # the bar is created when step 1 is about to run: its elapsed time at step 1 is the step's, not set-up's
    first = re.search(r"1/6 \[(\d+):(\d+)<", text)
    assert first, text[-2000:]
    assert int(first.group(1)) * 60 + int(first.group(2)) < s["setup_s"], (first.group(0), s["setup_s"])


def test_eval_sbatch_scores_the_trained_run(straight, slurm, tmp_path):
    """``sbatch --ntasks=4 slurm/eval.sbatch``: the run's adapters on held-out records of each client."""
    _, run, _ = straight
    log, out = tmp_path / "eval.out", tmp_path / "eval"
    job = slurm.submit("eval.sbatch", log, ["--ntasks=4"],
                       ["--config", "configs/default.yaml", "data.eval_fraction=0.05",
                        f"eval.adapters_dir={run / 'adapters'}", "generate.max_new_tokens=2", "eval.max_records=2",
                        "comm.timeout_s=30", f"run.output_dir={out}"])
    info = slurm.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    summary = json.loads((out / "eval_summary.json").read_text())
    # clients 0 and 1 hold prompt/response and chat records (2 answers each); client 2's are text only
    assert summary["clients"] == 3 and [c["scored"] for c in summary["per_client"]] == [2, 2, 0]
    assert math.isfinite(summary["overall"]["eval_loss"]) and summary["adapters_dir"] == str(run / "adapters")


def test_a_job_whose_ntasks_disagree_with_the_config_fails_fast_with_one_line(slurm, tmp_path):
    log = tmp_path / "job.out"
    job = slurm.submit("train.sbatch", log, ["--ntasks=3"], [*TRAIN, f"run.output_dir={tmp_path / 'out'}"])
    info = slurm.wait(job, log, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", _tail(log)
    errors = [line for line in log.read_text().splitlines() if line.startswith("fedsea: error:")]
    assert errors == ["fedsea: error: the config needs 4 ranks (topology.clients + topology.servers), "
                      "the job has 3 tasks"], _tail(log)
    assert not (tmp_path / "out").exists()  # nothing started


def test_scancel_of_a_running_job_ends_every_rank(slurm, tmp_path):
    log, out = tmp_path / "job.out", tmp_path / "out"
    # rank 0 sleeps through step 2: the job is mid-run, every rank alive, when it is cancelled
    job = slurm.submit("train.sbatch", log, ["--ntasks=4"],
                       [*TRAIN, f"run.output_dir={out}", "debug.stall_rank=0", "debug.stall_step=1",
                        "debug.stall_s=600"])
    deadline = time.monotonic() + 300
    while _metrics_rows(out) < 1 or len(_ranks_of(out)) < 4:
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _tail(log)
        time.sleep(1)
    slurm.cmd("scancel", job)
    info = slurm.wait(job, log, timeout=120)
    assert info["JobState"] == "CANCELLED", info
    deadline = time.monotonic() + 60  # KillWait (10 s) then SIGKILL: nothing may outlive it
    while _ranks_of(out) and time.monotonic() < deadline:
        time.sleep(1)
    assert _ranks_of(out) == [], subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout[-3000:]
    time.sleep(3)
    assert slurm.job(job)["JobState"] == "CANCELLED"  # not requeued: a cancel is not a preemption
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_signal_saves_requeues_and_the_resumed_job_ends_with_the_uninterrupted_losses(slurm, straight, tmp_path,
                                                                                         sig):
    """USR1: what ``#SBATCH --signal=USR1@120`` delivers before the time limit; TERM: what a
    preemption delivers to the step's tasks. Sent now with ``scancel --signal`` (the same signal to
    the same processes; Slurm's own timing of USR1 has a resolution of up to a minute): the ranks
    save at the next step boundary and exit 75, slurm/job.sh requeues the job, the requeued job
    resumes (run.resume=auto)."""
    _, _, ref = straight
    log, out = tmp_path / "job.out", tmp_path / "out"
    job = slurm.submit("train.sbatch", log, ["--ntasks=4"],
                       [*TRAIN, f"run.output_dir={out}", "debug.stall_rank=0", "debug.stall_step=2",
                        "debug.stall_s=15"])
    deadline = time.monotonic() + 300
    while _metrics_rows(out) < 2:  # rank 0 now sleeps at the start of step 3
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _tail(log)
        time.sleep(0.5)
    slurm.cmd("scancel", f"--signal={sig}", job)
    info = slurm.wait(job, log, until={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "requeueing job" in text and "resumed from" in text, text[-4000:]
    s = load_summary(out)
    assert s["checkpoints"]["resumed_at_step"] == 3
    assert s["losses"] == load_summary(straight[1])["losses"]
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert ref["JobState"] == "COMPLETED"


def test_generate_sbatch_completes_token_exact_with_transformers(slurm, tmp_path, smollm2_dir):
    """``sbatch --ntasks=3 slurm/generate.sbatch --config configs/generate.yaml`` on SmolLM2-135M
    (shortened answers): every client's file holds its prompts, token-exact with HF greedy generate."""
    log, out = tmp_path / "job.out", tmp_path / "out"
    new = 10
    job = slurm.submit("generate.sbatch", log, ["--ntasks=3"],
                       ["--config", "configs/generate.yaml", f"model.name_or_path={smollm2_dir}",
                        f"generate.max_new_tokens={new}", "comm.timeout_s=60", f"run.output_dir={out}"])
    info = slurm.wait(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    summary = json.loads((out / "generate_summary.json").read_text())
    assert summary["sequences"] == 6 and summary["clients"] == 2 and summary["servers"] == 1
    got = read_generations(out, 2)
    from transformers import AutoTokenizer

    from fedsea_hpc.model.loading import resolve_model

    msgs = [json.loads(line)["messages"] for line in (REPO / "configs/prompts/chat.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = resolve_model(str(smollm2_dir), tiny_vocab_size=0, seed=0).build_model()
    assert [[r["token_ids"] for r in g] for g in got] == hf_reference(model, tok, msgs, 2, 4, new, chat=True)
    assert "Paris" in got[0][0]["completion"], got[0][0]


def test_a_job_killed_by_its_time_limit_leaves_only_complete_checkpoints_and_resumes(slurm, straight, tmp_path):
    """``--time=1`` with rank 0 stuck in step 4 (alive, so no save can finish and USR1 cannot
    help): Slurm sends TERM at the limit and KILL after KillWait. What is left must not pass for
    a finished run (no summary.json, no adapters) and every ``step-*`` must be complete; an
    interrupted write is at most a ``.tmp-*``, which the next start clears. A new job with
    run.resume=auto continues from the newest complete step and ends with the uninterrupted losses."""
    log, out = tmp_path / "job.out", tmp_path / "out"
    # USR1@1: the signal (train.sbatch asks for USR1@120) comes at the limit, not before the stall
    job = slurm.submit("train.sbatch", log, ["--ntasks=4", "--time=1", "--signal=USR1@1",
                                             "--export=ALL,FEDSEA_REQUEUE=0"],
                       [*TRAIN, f"run.output_dir={out}", "run.save_every=1", "debug.stall_rank=0",
                        "debug.stall_step=3", "debug.stall_s=600"])
    info = slurm.wait(job, log, timeout=300)
    assert info["JobState"] == "TIMEOUT", (info, _tail(log))
    deadline = time.monotonic() + 60
    while _ranks_of(out) and time.monotonic() < deadline:
        time.sleep(1)
    assert _ranks_of(out) == []
    assert _metrics_rows(out) == 3, _tail(log)
    assert not (out / "summary.json").exists() and not (out / "adapters").exists()
    base = Path(checkpoint.root(str(out)))
    steps = sorted(p.name for p in base.iterdir() if p.name.startswith("step-"))
    done = checkpoint.complete(str(out))
    assert steps and steps == [Path(p).name for _, p in done], sorted(p.name for p in base.iterdir())
    assert all(p.name.startswith((".tmp-", "step-")) for p in base.iterdir()), sorted(base.iterdir())

    log2 = tmp_path / "again.out"
    job = slurm.submit("train.sbatch", log2, ["--ntasks=4"],
                       [*TRAIN, f"run.output_dir={out}", "run.save_every=1", "run.resume=auto"])
    info = slurm.wait(job, log2)
    assert info["JobState"] == "COMPLETED", _tail(log2)
    s = load_summary(out)
    assert s["checkpoints"]["resumed_at_step"] == done[-1][0]
    assert s["losses"] == load_summary(straight[1])["losses"]
    assert not [p for p in base.iterdir() if p.name.startswith(".tmp-")]


def test_a_sweep_runs_as_a_job_array_two_at_a_time_and_the_report_runs_after_it(slurm, tmp_path):
    """``fedsea sweep --slurm --max-parallel 2``: slurm/sweep.sbatch as ``--array=0-4%2`` (one
    point per task, SLURM_ARRAY_TASK_ID) and slurm/report.sbatch with ``--dependency=afterok``.
    A point with an invalid config is recorded as failed; its task still succeeds, so the report
    runs and lists it."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({
        "config": "configs/default.yaml", "set": {"train.steps": 3, "topology.servers": 1, "comm.timeout_s": 30},
        "points": [{"topology.clients": 1, "train.mode": "sequential"}, {"topology.clients": 1, "train.mode": "parallel"},
                   {"topology.clients": 2, "train.mode": "sequential"}, {"topology.clients": 2, "train.mode": "parallel"},
                   {"topology.clients": 1, "train.lr": -1}]}))
    out = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "fedsea_hpc", "sweep", "--grid", str(grid), "--out", str(out),
                        "--slurm", "--max-parallel", "2", "--sbatch-arg=--cpus-per-task=1"],
                       cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    array, collector = re.search(r"job array (\d+) \(5 points\) and report job (\d+) \(afterok:\1\)", p.stdout).groups()
    tasks = slurm.cmd("scontrol", "show", "job", "--oneliner", array)
    assert "ArrayTaskThrottle=2" in tasks, tasks
    log = out / f"slurm-report-{collector}.out"
    info = slurm.wait(collector, log, timeout=400)
    assert info["JobState"] == "COMPLETED", (info, _tail(log), slurm.cmd("scontrol", "show", "job", array))
    # every task ended before the report started; never more than two points ran at once
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in slurm.cmd(
        "scontrol", "show", "job", "--oneliner", array).splitlines() if line.strip()]
    assert sorted(int(r["ArrayTaskId"]) for r in records) == list(range(5))
    assert all(r["JobState"] == "COMPLETED" for r in records), records
    assert max(r["EndTime"] for r in records) <= info["StartTime"]
    runs = [json.loads((out / f"points/p00{i}/r0/run.json").read_text()) for i in range(5)]
    spans = [(r["started"], r["started"] + r["wall_s"]) for r in runs[:4]]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 2, spans  # %2
    assert [r["launcher"] for r in runs[:4]] == ["srun"] * 4 and runs[3]["command"][:2] == ["srun", "--ntasks=3"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["done"] * 4 + ["failed"], table
    assert table[4]["error"] == "fedsea: error: train.lr: must be > 0, got -1.0"
    assert (out / "throughput_vs_clients.png").is_file()
