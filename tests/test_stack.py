"""The pinned stack: the lock file, pyproject and the start-up check say the same, and a job
started on another transformers/peft/deepspeed is refused with one line and exit code 2."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import REPO, subprocess_env
from fedsea_hpc.stack import ALLOW_ENV, TESTED, StackError, check_stack


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_lock_file_pyproject_and_check_agree():
    lock = _pins(REPO / "launch" / "constraints.txt")
    pyproject = (REPO / "pyproject.toml").read_text()
    for name, version in TESTED.items():
        assert lock[name] == version, name
        assert f'"{name}=={version}"' in pyproject, name
    assert "torch" not in lock  # torch is pinned apart, so a cluster can keep its CUDA build
    assert _pins(REPO / "launch" / "constraints-cpu.txt")["torch"] == "2.13.0"


def test_this_venv_runs_the_tested_stack():
    assert check_stack() == []
    assert {n: metadata.version(n) for n in TESTED} == TESTED


def test_another_version_is_refused_or_only_warned_when_allowed(monkeypatch):
    other = dict(TESTED, transformers="5.99.0")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(StackError, match=r"transformers 5\.99\.0 is installed, .*transformers==5"):
        check_stack(other)
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert len(check_stack(other)) == 1


CLI_WITH_OTHER_PEFT = """
import sys
from importlib import metadata
real = metadata.version
metadata.version = lambda name: "0.0.1" if name == "peft" else real(name)
from fedsea_hpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_command_line_refuses_an_untested_stack_with_exit_2(tmp_path):
    env = subprocess_env()
    env.pop(ALLOW_ENV, None)
    proc = subprocess.run([sys.executable, "-c", CLI_WITH_OTHER_PEFT, "train", "train.mode=centralized",
                           f"run.output_dir={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("fedsea: error: peft 0.0.1 is installed"), proc.stderr
    assert not (tmp_path / "out").exists()
