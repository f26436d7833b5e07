"""Slurm host lists read without scontrol: the parser, the ``fedsea hostnames`` command, and
``slurm/master_addr.sh`` (what slurm/job.sh takes MASTER_ADDR from)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from fedsea_hpc.distributed.nodelist import NodeListError, expand, first

from conftest import REPO

GOOD = {
    "node01": ["node01"],
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "gpu-a[1-2],gpu-b3": ["gpu-a1", "gpu-a2", "gpu-b3"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "c[009-011]": ["c009", "c010", "c011"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "a,b[2-3],c.example.org": ["a", "b2", "b3", "c.example.org"],
    " fedsea-node[0-1] ": ["fedsea-node0", "fedsea-node1"],
}
BAD = {
    "": "empty",
    "node[1-": "'[' without ']'",
    "node1]": "']' without '['",
    "node[[1]]": "nested",
    "node[a-b]": "not a number",
    "node[5-2]": "backwards",
    "a,,b": "empty entry",
    "node[1-2],": "empty entry",
    "bad host": "not a host name",
}


@pytest.mark.parametrize("text", list(GOOD))
def test_expands_like_slurm(text):
    assert expand(text) == GOOD[text]
    assert first(text) == GOOD[text][0]


@pytest.mark.parametrize("text", list(BAD))
def test_unreadable_lists_say_what_is_wrong(text):
    with pytest.raises(NodeListError, match=re.escape(BAD[text])) as e:
        expand(text)
    assert repr(text) in str(e.value)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no scontrol here to compare with")
def test_agrees_with_scontrol(tmp_path):
    # scontrol wants a slurm.conf even to expand a list; a minimal one (no daemon is asked).
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for text, want in GOOD.items():
        got = subprocess.run(["scontrol", "show", "hostnames", text.strip()], capture_output=True, text=True, env=env)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split() == want == expand(text), text


def _no_scontrol_env() -> dict:
    """PATH with this Python's bin dir and the system's basics, but no scontrol on it."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FEDSEA_SCONTROL": "none"}


def test_master_addr_script_without_scontrol():
    script = REPO / "slurm" / "master_addr.sh"
    ok = subprocess.run(["bash", str(script)], cwd=REPO, env={**_no_scontrol_env(), "SLURM_JOB_NODELIST": "gpu-a[07-09],gpu-b1"},
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "gpu-a07"
    bad = subprocess.run(["bash", str(script)], cwd=REPO, env={**_no_scontrol_env(), "SLURM_JOB_NODELIST": "gpu-a[07-"},
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("fedsea: error: SLURM_JOB_NODELIST: cannot read the host list"), bad.stderr
    assert "Traceback" not in bad.stderr


def test_hostnames_command():
    run = subprocess.run([sys.executable, "-m", "fedsea_hpc", "hostnames", "node[1-3]"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["node1", "node2", "node3"], run.stderr
    bad = subprocess.run([sys.executable, "-m", "fedsea_hpc", "hostnames", "--first", "node[3-1]"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "runs backwards" in bad.stderr and "Traceback" not in bad.stderr
