"""Failures under the real entry point: bad input exits 2 on every rank before any work, and a
rank that dies takes the whole job down (with and without an MPI launcher to kill the rest).
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, fedsea_command, run_fedsea, subprocess_env, with_free_port

pytestmark = pytest.mark.multirank


# ------------------------------------------------------------------ bad input


BAD_INPUTS = {
    # name: (overrides, ranks, key the message must name)
    "unknown_key": (["train.stepz=3"], 2, "train.stepz"),
    "wrong_type": (["train.steps=abc"], 2, "train.steps"),
    "world_mismatch": (["topology.clients=3", "topology.servers=2"], 4, "topology."),
    "split_too_deep": (["split.head_layers=5"], 2, "split.head_layers"),
    "zero_stage": (["deepspeed.zero_stage=4"], 2, "deepspeed.zero_stage"),
    "missing_data": (["data.train_files=[missing.jsonl]"], 2, "data.train_files"),
    "deepspeed_extra": (["deepspeed.extra={gradient_clipping: 1.0}"], 2, "deepspeed.extra"),
    "noise_mode": (["privacy.noise_mode=loud"], 2, "privacy.noise_mode"),
    "rebalance_every": (["split.rebalance=every", "split.rebalance_every=0"], 2, "split.rebalance_every"),
    "schedule_too_deep": (["debug.partition_schedule=[[1,3,3]]"], 2, "debug.partition_schedule[0]"),
    "memory_budget": (["split.client_memory_mb=[0.1]"], 2, "split.client_memory_mb"),
    "resume_missing": (["run.resume=/nonexistent/step-00000004"], 2, "run.resume"),
    "max_wait": (["comm.max_wait_s=-1"], 2, "comm.max_wait_s"),
    "eval_missing": (["data.eval_files=[missing.jsonl]"], 2, "data.eval_files[0]"),
    "eval_fraction": (["data.eval_fraction=0.7"], 2, "data.eval_fraction"),
    "eval_every": (["train.eval_every=-2", "data.eval_fraction=0.1"], 2, "train.eval_every"),
    # Found by the client rank that reads it, after the ranks met: the preflight tells every rank.
    "eval_no_records": (["data.eval_files=[{root}/blank.jsonl]"], 2, "data.eval_files[0]"),
    "eval_bad_record": (["topology.clients=2", "data.eval_files=[{root}/good.jsonl,{root}/bad.jsonl]"], 3,
                        "data.eval_files[1]"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, mpiexec_path):
    """All bad-input launches at once (they fail before any communication, so they don't interact)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "blank.jsonl").write_text("\n\n")  # no record at all
    (root / "good.jsonl").write_text('{"text": "a held-out line"}\n')
    (root / "bad.jsonl").write_text('{"prompt": "2+2=", "response": ""}\n')  # a record it cannot learn from
    procs = {}
    for name, (args, n, _) in BAD_INPUTS.items():
        extra = [] if name == "world_mismatch" else ["topology.clients=1", "topology.servers=1"]
        cmd = fedsea_command([*extra, *(a.replace("{root}", str(root)) for a in args), f"run.output_dir={root / name}"], n)
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), time.monotonic())
    results = {}
    try:
        for name, (p, t0) in procs.items():
            stdout, stderr = p.communicate(timeout=max(1.0, 90 - (time.monotonic() - t0)))
            results[name] = (p.returncode, stdout, stderr, root / name)
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_before_starting_on_every_rank(bad_runs, name):
    _, n, key = BAD_INPUTS[name]
    rc, stdout, stderr, out = bad_runs[name]
    assert rc == 2, f"exit {rc}\n{stdout}\n{stderr}"
    lines = [line for line in (stdout + stderr).splitlines() if "fedsea: error:" in line]
    assert len(lines) == n, lines  # one line per rank
    assert {line.split("]")[0] for line in lines} == {f"[rank {r}" for r in range(n)}
    for line in lines:
        assert line.split("fedsea: error: ", 1)[1].startswith(key) or key in line, line
    assert "Traceback" not in stderr and "fatal" not in stderr
    assert not (out / "config.yaml").exists()
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------ a rank dies


@dataclass
class PlainRanks:
    """Outcome of plain (launcher-less) rank processes; ``returncode``/``stdout`` as for with_free_port."""
    returncodes: list[int | None]  # None: still running at the deadline (then killed)
    logs: list[str]

    @property
    def returncode(self) -> int:
        return 0 if all(rc == 0 for rc in self.returncodes) else 1

    @property
    def stdout(self) -> str:
        return "\n".join(self.logs)


def run_plain_ranks(args: list[str], world: int, port: int, root: Path, deadline_s: float) -> PlainRanks:
    """``world`` plain ``fedsea train`` processes with torchrun-style variables, waited up to ``deadline_s``."""
    root.mkdir(parents=True)
    procs, logs = [], []
    for r in range(world):
        env = subprocess_env(dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port)))
        log = open(root / f"rank{r}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(fedsea_command([*args, f"run.output_dir={root / 'out'}"]), cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    codes: list[int | None] = [None] * world
    t0 = time.monotonic()
    try:
        # A hang bound, not a speed check: ranks that never exit fail the test instead of blocking CI.
        while any(c is None for c in codes) and time.monotonic() - t0 < deadline_s:
            codes = [p.poll() for p in procs]
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read())
        log.close()
    return PlainRanks(codes, text)


def test_dead_rank_takes_the_job_down_torchrun_style(tmp_path):
    """Four plain processes (no MPI launcher to kill the survivors): they must exit on their own."""
    args = ["topology.clients=2", "topology.servers=2", "debug.fail_rank=2", "debug.fail_step=3",
            "comm.timeout_s=20", "train.steps=30"]
    res = with_free_port(lambda port: run_plain_ranks(args, 4, port, tmp_path / f"port{port}", deadline_s=180))
    codes, text = res.returncodes, res.logs
    assert None not in codes, f"ranks still running after 180 s: {[r for r, c in enumerate(codes) if c is None]}\n{text}"
    assert codes[2] == 3, text[2]
    assert "debug.fail_rank" in text[2]
    for r in (0, 1, 3):
        assert codes[r] != 0, (r, text[r])
        assert "done:" not in text[r]
        # Each survivor ends on a closed connection (the death, directly or passed on), not by
        # sitting out comm.timeout_s.
        fatal = [line for line in text[r].splitlines() if line.startswith(f"[rank {r}] fatal:")]
        assert len(fatal) == 1, (r, text[r][-3000:])
        assert "timed out" not in fatal[0].lower(), fatal[0]
    assert any("lost rank 2" in text[r] for r in (0, 1, 3)), {r: text[r][-2000:] for r in (0, 1, 3)}


def test_dead_rank_under_mpiexec_exits_nonzero(tmp_path, mpiexec_path):
    proc = run_fedsea(["topology.clients=2", "topology.servers=2", "debug.fail_rank=2", "debug.fail_step=3",
                       "comm.timeout_s=20", "train.steps=30", f"run.output_dir={tmp_path / 'out'}"], n=4, timeout=180)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "exiting abruptly at step 3" in text
    assert "done:" not in text
