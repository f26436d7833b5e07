"""Reliability through the real entry point: checkpoint and resume, restarts, signals, a full
disk, and slow versus dead peers (the README's fault matrix points here, row by row).

Checkpoint and resume: a run of N steps, and the same run resumed from its own checkpoint at
step k in a fresh launch, give the same losses bit for bit.

Each case runs once uninterrupted with ``run.save_every`` (its checkpoints are the resume
points), then a fresh launch with ``run.resume=<checkpoint>`` into another directory. The cases
cover ZeRO 0, 2 and 3, LoRA and full fine-tuning, parallel and sequential, ``avg_every`` 1 and
> 1, activation noise on (a fixed test seed, so that both runs draw the same stream and only a
restored generator state can make them agree), LoRA dropout (the torch RNG streams) and secure
aggregation (3 clients: fresh keys per launch, the sums do not depend on them). The pure parts
of checkpointing (finding, checking, writing, tidying) are tested without ranks in
``test_checkpoint_files.py``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, check_ok, fedsea_command, load_metrics, load_summary, run_fedsea, subprocess_env
from fedsea_hpc.components import checkpoint
from fedsea_hpc.config import load_config
from fedsea_hpc.config.validate import shipped_data_files
from fedsea_hpc.distributed import liveness

N = 8
NOISE = ["privacy.noise_std=0.05", "privacy.noise_seed=11"]
CASES = {  # name: (clients, servers, save_every, resume at, overrides)
    "par-z3-lora-fedsgd-secagg": (3, 2, 4, 4, ["deepspeed.zero_stage=3", "federated.avg_every=1", *NOISE]),
    "seq-z2-full-avg2": (2, 1, 3, 6, ["train.mode=sequential", "deepspeed.zero_stage=2", "peft.lora_r=0",
                                      "federated.avg_every=2", "run.keep_checkpoints=1", *NOISE]),
    "par-z0-lora-avg3-dropout": (2, 2, 5, 5, ["deepspeed.zero_stage=0", "federated.avg_every=3",
                                              "peft.lora_dropout=0.1", *NOISE]),
}


class Runs:
    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, name: str, args: list[str], n: int) -> Path:
        if name not in self.cache:
            out = self.root / name
            check_ok(run_fedsea([*args, f"run.output_dir={out}"], n=n, timeout=300))
            self.cache[name] = out
        return self.cache[name]

    def pair(self, case: str) -> tuple[Path, Path]:
        """(the uninterrupted run, the run resumed from its checkpoint)."""
        clients, servers, every, at, over = CASES[case]
        base = [f"topology.clients={clients}", f"topology.servers={servers}", f"train.steps={N}", *over]
        full = self.get(case, [*base, f"run.save_every={every}"], clients + servers)
        ckpt = full / "checkpoints" / checkpoint.step_name(at)
        resumed = self.get(f"{case}-resumed", [*base, f"run.resume={ckpt}"], clients + servers)
        return full, resumed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_repeats_the_uninterrupted_losses_bitwise(runs, case):
    full, resumed = runs.pair(case)
    a, b = load_summary(full), load_summary(resumed)
    assert len(a["losses"]) == len(b["losses"]) == N
    assert b["losses"] == a["losses"], [x - y for x, y in zip(b["losses"], a["losses"])]  # exactly, float32
    rows = load_metrics(resumed)
    assert [r["step"] for r in rows] == list(range(1, N + 1))  # no duplicates, no gaps
    at = CASES[case][3]
    assert rows[:at] == load_metrics(full)[:at]  # the checkpoint's own rows, carried over
    assert b["checkpoints"]["resumed_at_step"] == at and b["checkpoints"]["load_s"] > 0


@pytest.mark.multirank
def test_checkpoints_are_complete_and_pruned(runs):
    full, _ = runs.pair("seq-z2-full-avg2")  # save_every=3, keep_checkpoints=1, 8 steps
    base = full / "checkpoints"
    assert sorted(os.listdir(base)) == ["step-00000006"]  # step 3 pruned once step 6 was complete
    ck = base / "step-00000006"
    mark = json.loads((ck / checkpoint.MARKER).read_text())
    assert mark["step"] == 6 and "client0.pt" in mark["files"] and "server_full.pt" in mark["files"]
    assert any(f.startswith("server/ds/") for f in mark["files"])
    saved = load_summary(full)["checkpoints"]["saved"]
    assert [s["step"] for s in saved] == [3, 6] and saved[1]["bytes"] == checkpoint.size_bytes(ck)
    assert all(s["save_s"] > 0 for s in saved)
    meta = json.loads((ck / checkpoint.META).read_text())
    assert (meta["clients"], meta["servers"], meta["zero_stage"], meta["mode"]) == (2, 1, 2, "sequential")
    assert meta["config"]["peft"]["lora_r"] == 0
    # run.resume=auto picks it; a damaged newest one falls back to the previous complete one.
    cfg = load_config(None, [f"run.output_dir={full}", "run.resume=auto"])
    assert checkpoint.find(cfg.run).path == str(ck)


@pytest.mark.multirank
def test_resume_on_fewer_servers_loads_the_consolidated_part_b(runs):
    """2 → 1 servers (and ZeRO-3 → 2): Part B comes from ``server_full.pt`` (gathered fp32 values
    and AdamW moments by name); the losses match the unchanged resume within 1e-5."""
    full, same = runs.pair("par-z3-lora-fedsgd-secagg")
    clients, _, _, at, over = CASES["par-z3-lora-fedsgd-secagg"]
    over = [o for o in over if not o.startswith("deepspeed.zero_stage")]
    ckpt = full / "checkpoints" / checkpoint.step_name(at)
    one = runs.get("resumed-on-1-server", [f"topology.clients={clients}", "topology.servers=1", f"train.steps={N}",
                                           "deepspeed.zero_stage=2", *over, f"run.resume={ckpt}"], clients + 1)
    a, b = load_summary(same)["losses"], load_summary(one)["losses"]
    assert a[:at] == b[:at]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


@pytest.mark.multirank
def test_a_silo_that_left_is_dropped_and_the_others_continue_where_they_were(runs):
    """3 clients saved at step 4, resumed with run.resume_clients=[0,2] (client 1's silo left): the
    two that stay bring their parts, optimizer state, data shard and position, so each one's loss
    at step 5 (before any update of the smaller job) is the one it had in the 3-client run."""
    case = "par-z3-lora-fedsgd-secagg"
    full, _ = runs.pair(case)
    _, servers, _, at, over = CASES[case]
    out = runs.root / "left"
    files = shipped_data_files()[:3]  # what the 3-client run read (one file per client)
    proc = run_fedsea(["topology.clients=2", f"topology.servers={servers}", f"train.steps={N}", *over,
                       f"run.resume={full / 'checkpoints' / checkpoint.step_name(at)}", "run.resume_clients=[0,2]",
                       f"data.train_files=[{files[0]},{files[2]}]",  # each silo that stays brings its own file
                       f"run.output_dir={out}"], n=2 + servers)
    check_ok(proc)
    assert "client(s) [1] left: their client-side state is dropped" in proc.stderr
    rows, ref = load_metrics(out), load_metrics(full)
    assert [r["step"] for r in rows] == list(range(1, N + 1)) and rows[:at] == ref[:at]
    first = rows[at]["client_loss"]
    assert len(first) == 2
    assert abs(first[0] - ref[at]["client_loss"][0]) < 1e-6 and abs(first[1] - ref[at]["client_loss"][2]) < 1e-6
    assert rows[at]["tokens"] < ref[at]["tokens"]  # two silos' tokens, not three
    assert load_summary(out)["checkpoints"]["resumed_at_step"] == at


def _rank_pids(out: Path) -> list[int]:
    """PIDs of the python ranks whose command line names ``out`` (not the launcher)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"run.output_dir={out}".encode() in argv and argv[1:3] == [b"-m", b"fedsea_hpc"]:
                pids.append(int(d.name))
    return sorted(pids)


@pytest.mark.multirank
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_auto_resume_finishes_the_run(runs, tmp_path):
    """SIGTERM to one rank (as Slurm sends on preemption or scancel): every rank saves the same
    checkpoint after the current step and exits 75; ``run.resume=auto`` in the same directory then
    finishes with the uninterrupted run's losses. The stopped launch sleeps on an EMULATED 100 ms
    link so that it is still running when the signal comes (sleeps change no number)."""
    case = "par-z0-lora-avg3-dropout"
    full, _ = runs.pair(case)
    clients, servers, _, _, over = CASES[case]
    base = [f"topology.clients={clients}", f"topology.servers={servers}", f"train.steps={N}", *over]
    out = tmp_path / "preempted"
    proc = subprocess.Popen(fedsea_command([*base, "emulate.link_latency_ms=[100,100]", f"run.output_dir={out}"],
                                           n=clients + servers), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        pids = _rank_pids(out)
        assert len(pids) == clients + servers, pids
        os.kill(pids[-1], signal.SIGTERM)
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, text[-4000:]
    assert "stopped on a signal after step" in text
    ((step, path),) = checkpoint.complete(out)
    assert 2 <= step < N and not (out / "summary.json").exists()
    assert [r["step"] for r in load_metrics(out)] == list(range(1, step + 1))
    check_ok(run_fedsea([*base, f"run.output_dir={out}", "run.resume=auto"], n=clients + servers, timeout=300))
    assert load_summary(out)["losses"] == load_summary(full)["losses"]
    assert [r["step"] for r in load_metrics(out)] == list(range(1, N + 1))


@pytest.mark.multirank
@pytest.mark.parametrize("fail_rank,fault", [(1, "fail_step=5"), (3, "fail_step=5"), (0, "fail_step=5"),
                                             (3, "fail_save=6")],
                         ids=["client", "server", "rank0", "server-during-save"])
def test_local_sh_restarts_a_failed_job_from_its_last_checkpoint(runs, tmp_path, fail_rank, fault):
    """``run.max_restarts=1``: a rank killed at the start of step 6 (0-based 5), or in the middle
    of writing the checkpoint after step 6 (its files written, no COMPLETE marker yet), ends the
    first attempt; launch/local.sh starts the job again with run.resume=auto from the checkpoint
    at step 4, and it finishes with the uninterrupted run's losses. The half-written save is gone."""
    case = "par-z0-lora-avg3-dropout"
    full, _ = runs.pair(case)
    clients, servers, _, _, over = CASES[case]
    out = tmp_path / "restarted"
    args = [f"topology.clients={clients}", f"topology.servers={servers}", f"train.steps={N}", *over,
            "run.save_every=2", "run.max_restarts=1", f"debug.fail_rank={fail_rank}", f"debug.{fault}",
            "run.progress=false", "comm.timeout_s=20", f"run.output_dir={out}"]
    proc = subprocess.run(["bash", "launch/local.sh", "train", "--config", str(REPO / "tests/data/defaults.yaml"),
                           *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    check_ok(proc)
    assert "restart 1 of 1 from the last checkpoint" in proc.stderr
    said = "exiting abruptly at step 5" if fault.startswith("fail_step") else "exiting abruptly while saving after step 6"
    assert said in proc.stdout + proc.stderr
    assert load_summary(out)["losses"] == load_summary(full)["losses"]
    assert [r["step"] for r in load_metrics(out)] == list(range(1, N + 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint.step_name(6), checkpoint.step_name(8)]


@pytest.mark.multirank
def test_a_full_disk_stops_the_save_with_one_line_and_keeps_the_previous_checkpoint(runs, tmp_path):
    """checkpoints/ on a real tmpfs (root mounts it) with room for one checkpoint and a half: the
    save after step 4 runs out of space. The job ends with one line naming the directory and the
    cause, step-2 stays complete, and once there is room run.resume=auto finishes the run."""
    case = "par-z0-lora-avg3-dropout"
    full, _ = runs.pair(case)
    size = sum(f.stat().st_size for f in (full / "checkpoints" / checkpoint.step_name(5)).rglob("*") if f.is_file())
    clients, servers, _, _, over = CASES[case]
    out = tmp_path / "full"
    mnt = out / "checkpoints"
    mnt.mkdir(parents=True)
    args = [f"topology.clients={clients}", f"topology.servers={servers}", f"train.steps={N}", *over,
            "run.save_every=2", "run.keep_checkpoints=1", f"run.output_dir={out}"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mnt)], check=True)
    try:
        proc = run_fedsea(args, n=clients + servers)
        assert proc.returncode != 0, proc.stdout[-2000:]
        text = proc.stdout + proc.stderr
        assert "checkpoint after step 4: writing" in text and "no space left on the device" in text, text[-3000:]
        assert f"the previous checkpoint {mnt / checkpoint.step_name(2)} is intact" in text
        assert [s for s, _ in checkpoint.complete(out)] == [2]
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(mnt)], check=True)
        check_ok(run_fedsea([*args, "run.resume=auto"], n=clients + servers))
        assert load_summary(out)["losses"] == load_summary(full)["losses"]
        assert not [p for p in mnt.iterdir() if p.name.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.multirank
def test_a_slow_peer_is_waited_for_and_a_slow_checkpoint_write_does_not_stop_training(runs):
    """comm.timeout_s=3 and a client that sleeps 10 s (EMULATED slow peer: a long generation
    round, a late turn): before heartbeats every waiting rank gave up after 3 s; now the run
    finishes with the uninterrupted run's losses. The same launch saves every 2 steps through a
    writer that sleeps 8 s first on every rank (debug.slow_save_s, an EMULATED slow filesystem):
    the checkpoint after step 2 is published only after a later step ran, the losses do not
    change, and every checkpoint is complete by the end."""
    case = "par-z0-lora-avg3-dropout"
    full, _ = runs.pair(case)
    clients, servers, _, _, over = CASES[case]
    out = runs.root / "slow"
    proc = run_fedsea([f"topology.clients={clients}", f"topology.servers={servers}", f"train.steps={N}", *over,
                       "comm.timeout_s=3", "debug.stall_rank=1", "debug.stall_step=2", "debug.stall_s=10",
                       "run.save_every=2", "run.keep_checkpoints=4", "debug.slow_save_s=8",
                       f"run.output_dir={out}"], n=clients + servers)
    check_ok(proc)
    assert "sleeping 10 s at step 2 (EMULATED slow peer)" in proc.stdout + proc.stderr
    assert load_summary(out)["losses"] == load_summary(full)["losses"]
    assert max(r["step_time_s"] for r in load_metrics(out)) > 3
    saved = load_summary(out)["checkpoints"]["saved"]
    assert [s["step"] for s in saved] == [2, 4, 6, 8]
    assert saved[0]["published_after_step"] > 2 and saved[0]["save_s"] < 8  # the steps went on meanwhile
    assert all(s["published_after_step"] >= s["step"] for s in saved)
    kept = checkpoint.complete(str(out))
    assert [k for k, _ in kept] == [2, 4, 6, 8] and not list((out / "checkpoints").glob(".tmp-*"))
    assert all(checkpoint.read(p).step == k for k, p in kept)  # every file matches its size and CRC-32


@pytest.mark.multirank
def test_a_frozen_peer_is_declared_lost_by_its_heartbeat(tmp_path):
    """SIGSTOP to a server rank: its sockets stay open, so only the heartbeat can tell. The
    others declare it lost after comm.timeout_s=4 and the job ends (bounded generously here: a
    hang is the failure, not a slow detection)."""
    out = tmp_path / "frozen"
    proc = subprocess.Popen(fedsea_command(["topology.clients=2", "topology.servers=2", "train.steps=100000",
                                            "comm.timeout_s=4", f"run.output_dir={out}"], n=4),
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        pids = _rank_pids(out)
        assert len(pids) == 4, pids
        os.kill(pids[-1], signal.SIGSTOP)
        t0 = time.monotonic()
        text, _ = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert re.search(r"fatal: lost rank \d \(no heartbeat for \d+ s\); comm.timeout_s=4", text), text[-3000:]
    assert 4 - liveness.beat_interval(4) - 0.5 < waited < 40, waited  # quiet since its last beat before the stop
    assert not _rank_pids(out)


# ------------------------------------------------------------------ without ranks


def test_the_watch_names_a_peer_whose_counter_stopped_and_only_that_one():
    w = liveness.Watch([1, 2, 3], timeout_s=5.0, now=100.0)
    for t in range(101, 110):
        w.see(1, t, float(t))  # beating
        w.see(2, 7, float(t))  # stuck at 7 since t=101
    assert w.lost(104.0) == []  # 3 never seen: quiet since 100, not yet for 5 s
    assert w.lost(105.5) == [(3, 5.5)]
    assert w.lost(106.5) == [(2, 5.5), (3, 6.5)]
    w.forget(3)  # marked done: an early finisher is not dead
    assert [p for p, _ in w.lost(200.0)] == [1, 2]
    assert liveness.beat_interval(60) == 1.0 and liveness.beat_interval(2) == 0.4
