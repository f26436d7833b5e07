"""Checkpoint files without ranks: finding the newest complete one, the snapshot and background
writer that save one, tidying a crashed save, checking a resume against the config, and the
checkpoint settings' errors. The multi-rank save/resume behaviour is in ``test_reliability.py``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedsea_hpc.components import checkpoint, saving
from fedsea_hpc.config import load_config


def _fake(base: Path, step: int, *, marker: bool = True, extra: dict | None = None) -> Path:
    d = base / "checkpoints" / checkpoint.step_name(step)
    d.mkdir(parents=True)
    (d / "client0.pt").write_bytes(b"x" * 10)
    (d / checkpoint.META).write_text(json.dumps({"format": checkpoint.FORMAT, "step": step}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, step + 1)))
    files = {n: {"bytes": (d / n).stat().st_size, "crc32": checkpoint.crc32(d / n)} for n in ("client0.pt", checkpoint.META)}
    files.update({n: {"bytes": b, "crc32": 0} for n, b in (extra or {}).items()})
    if marker:
        (d / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": files}))
    return d


def test_find_takes_the_latest_complete_checkpoint_and_skips_damaged_ones(tmp_path, capfd):
    run = lambda resume: load_config(None, [f"run.output_dir={tmp_path}", f"run.resume={resume}"]).run  # noqa: E731
    assert checkpoint.find(run("auto")) is None  # nothing yet: start fresh
    assert checkpoint.find(run("off")) is None
    four = _fake(tmp_path, 4)
    _fake(tmp_path, 8, marker=False)  # an interrupted save: no marker, never picked
    (tmp_path / "checkpoints" / ".tmp-step-00000012").mkdir()
    assert checkpoint.find(run("auto")).path == str(four)
    twelve = _fake(tmp_path, 12, extra={"server_full.pt": 99})  # the marker names a file that is gone
    assert checkpoint.find(run("auto")).path == str(four)
    assert "server_full.pt: missing or truncated (expected 99 bytes); trying the previous" in capfd.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=r"run\.resume: .*server_full\.pt: missing or truncated"):
        checkpoint.find(run(twelve))
    sixteen = _fake(tmp_path, 16)
    (sixteen / "client0.pt").write_bytes(b"y" * 10)  # same size, other bytes: bit rot
    assert checkpoint.find(run("auto")).path == str(four)
    assert "client0.pt: corrupt (its CRC-32 differs from the one in COMPLETE); trying the previous" in capfd.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=r"run\.resume: .*step-00000008: no COMPLETE marker"):
        checkpoint.find(run(tmp_path / "checkpoints" / "step-00000008"))
    with pytest.raises(checkpoint.CheckpointError, match=r"run\.resume: .*/nope: not a directory; give off, auto"):
        checkpoint.find(run(tmp_path / "nope"))


def test_a_snapshot_does_not_see_later_changes_and_keeps_the_containers():
    import collections

    import torch

    w = torch.zeros(4)
    state = {"w": w, "view": w[1:3], "opt": collections.OrderedDict(m=[torch.ones(2), (torch.ones(1), 3)]),
             "d": collections.defaultdict(list, a=[torch.ones(1)]), "n": 5, "s": "x"}
    snap = saving.snapshot(state)
    w += 1
    state["opt"]["m"][0].mul_(7)
    assert torch.equal(snap["w"], torch.zeros(4)) and torch.equal(snap["opt"]["m"][0], torch.ones(2))
    assert snap["view"].untyped_storage().nbytes() == 2 * 4  # a view is saved as its own elements
    assert type(snap["opt"]) is collections.OrderedDict and isinstance(snap["opt"]["m"][1], tuple)
    assert snap["d"].default_factory is list and snap["n"] == 5 and snap["s"] == "x"


def test_the_writer_notes_sizes_and_crcs_and_keeps_its_first_error(tmp_path):
    import torch

    wr = saving.Writer()
    where = (str(tmp_path), 4)
    t = torch.arange(10.0)
    wr.save({"t": t}, str(tmp_path / "a" / "x.pt"), where)
    t.zero_()  # after the snapshot: not in the file
    wr.text("hello", str(tmp_path / "m.txt"), where)
    wr.wait()
    assert not wr.busy()
    assert torch.equal(torch.load(tmp_path / "a" / "x.pt")["t"], torch.arange(10.0))
    for f in (tmp_path / "a" / "x.pt", tmp_path / "m.txt"):
        assert wr.written[str(f)] == {"bytes": f.stat().st_size, "crc32": checkpoint.crc32(f)}
    wr.text("x", str(tmp_path / "no" / "such" / "dir.txt"), where)
    wr.wait()
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint after step 4: writing .* failed: No such file"):
        wr.check(str(tmp_path))


def test_tidy_clears_a_crashed_save_and_puts_a_set_aside_checkpoint_back(tmp_path):
    four, six = _fake(tmp_path, 4), _fake(tmp_path, 6)
    base = tmp_path / "checkpoints"
    (base / ".tmp-step-00000008").mkdir()  # a save that never got its marker
    os.rename(six, base / "step-00000006.old")  # a crash between the two renames of a re-save
    (base / "step-00000004.old").mkdir()  # ... and one after both renames
    checkpoint.tidy(str(tmp_path))
    assert sorted(p.name for p in base.iterdir()) == ["step-00000004", "step-00000006"]
    assert [s for s, _ in checkpoint.complete(tmp_path)] == [4, 6] and four.is_dir()


def test_a_resume_must_have_steps_left_and_name_the_clients_that_continue(tmp_path, capfd):
    res = checkpoint.Resume(str(tmp_path), 8, {"clients": 3, "config": {}, "splits": [[1, 1], [2, 1], [1, 3]],
                                               "silos": [0, 1, 2]})
    cfg = lambda *o: load_config(None, ["train.steps=20", "topology.servers=1", "run.resume=auto", *o])  # noqa: E731
    with pytest.raises(checkpoint.CheckpointError, match=r"train\.steps: .* at step 8, nothing left to run"):
        checkpoint.check_resume(res, load_config(None, ["train.steps=8", "topology.clients=3"]), 0)
    with pytest.raises(checkpoint.CheckpointError, match=r"run\.resume_clients: .* has 3 clients and "
                                                         r"topology\.clients=2; list which"):
        checkpoint.check_resume(res, cfg("topology.clients=2"), 0)
    for bad in ("[0]", "[0,0]", "[0,3]", "[0,true]"):
        with pytest.raises(checkpoint.CheckpointError, match=r"run\.resume_clients: must list 2 distinct"):
            checkpoint.check_resume(res, cfg("topology.clients=2", f"run.resume_clients={bad}"), 0)
    same = checkpoint.check_resume(res, cfg("topology.clients=3"), 0)
    assert same.sources == (0, 1, 2) and same.same_clients
    two = checkpoint.check_resume(res, cfg("topology.clients=2", "run.resume_clients=[2,0]"), 0)
    assert two.sources == (2, 0) and not two.same_clients
    assert two.splits == [(1, 3), (1, 1)] and two.silos == [2, 0] and two.shards == 3
    assert "clients [2, 0] of its 3; client(s) [1] left: their client-side state is dropped" in capfd.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("run.save_every=-1", r"run\.save_every: must be an integer >= 0"),
    ("run.keep_checkpoints=0", r"run\.keep_checkpoints: must be an integer >= 1"),
    ("run.resume_clients=[0]", r"run\.resume_clients: only with run\.resume"),
])
def test_bad_checkpoint_settings_name_the_key(override, message):
    from fedsea_hpc.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
