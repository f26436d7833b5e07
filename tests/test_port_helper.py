"""conftest.with_free_port: a launch that lost its port to another process is retried on a new one."""
from __future__ import annotations

import socket
import subprocess

import pytest

import conftest
from conftest import with_free_port


@pytest.fixture
def ports(monkeypatch):
    """Hand out 40001, 40002, ... instead of real free ports, and record them."""
    given: list[int] = []

    def fake() -> int:
        given.append(40001 + len(given))
        return given[-1]

    monkeypatch.setattr(conftest, "free_port", fake)
    return given


def test_a_taken_port_is_retried_with_another(monkeypatch):
    # Prepare: the first port handed out is held by a listening socket.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    handed = iter([taken, conftest.free_port()])
    monkeypatch.setattr(conftest, "free_port", lambda: next(handed))
    tried = []

    def launch(port: int) -> int:
        tried.append(port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # OSError EADDRINUSE on the taken port
            return port

    # Execute
    try:
        got = with_free_port(launch)
    finally:
        holder.close()
    # Assert
    assert tried[0] == taken and got == tried[1] != taken and len(tried) == 2


def test_exception_saying_address_in_use_is_retried(ports):
    def launch(port: int) -> str:
        if len(ports) < 3:
            raise RuntimeError(f"The server socket has failed to listen. port: {port}, name: EADDRINUSE")
        return "ok"

    assert with_free_port(launch) == "ok"
    assert ports == [40001, 40002, 40003]


def test_failed_process_saying_address_in_use_is_retried(ports):
    def launch(port: int) -> subprocess.CompletedProcess:
        if len(ports) == 1:
            return subprocess.CompletedProcess([], 1, stdout="", stderr="bind: Address already in use\n")
        return subprocess.CompletedProcess([], 0, stdout=f"port {port}", stderr="")

    proc = with_free_port(launch)
    assert proc.returncode == 0 and proc.stdout == "port 40002" and ports == [40001, 40002]


def test_other_failures_are_not_retried(ports):
    def fails(port: int):
        raise RuntimeError("Connection reset by peer")

    with pytest.raises(RuntimeError, match="reset"):
        with_free_port(fails)
    assert ports == [40001]
    # a failed process for another reason comes back as it is
    bad = subprocess.CompletedProcess([], 2, stdout="", stderr="fedsea: error: train.steps")
    assert with_free_port(lambda port: bad) is bad and ports == [40001, 40002]
    # a successful process that merely mentions the text is not a failure
    ok = subprocess.CompletedProcess([], 0, stdout="Address already in use (retried)", stderr="")
    assert with_free_port(lambda port: ok) is ok and ports == [40001, 40002, 40003]


def test_gives_up_after_the_last_attempt(ports):
    def always_taken(port: int):
        raise OSError(98, "Address already in use")

    with pytest.raises(OSError, match="Address already in use"):
        with_free_port(always_taken, attempts=2)
    assert ports == [40001, 40002]
    taken = subprocess.CompletedProcess([], 1, stdout=b"", stderr=b"EADDRINUSE")  # bytes output too
    assert with_free_port(lambda port: taken, attempts=2) is taken and len(ports) == 4
