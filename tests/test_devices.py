"""topology.client_device / server_device and comm.backend (fedsea_hpc.distributed.devices):
which backend a job takes, where each role computes and where its messages are staged. The
GPU cases run here on the rules alone (the availability is an argument); tests/test_gpu.py
runs the real thing where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, run_fedsea
from fedsea_hpc.config import ConfigError, load_config
from fedsea_hpc.distributed.devices import DeviceError, backends, resolve


@pytest.mark.parametrize("backend, client, server, gpu, expect", [
    ("auto", "auto", "auto", False, ("gloo", "gloo")),  # today's CPU job
    ("auto", "auto", "auto", True, ("nccl", "nccl")),  # every rank on its GPU
    ("auto", "cpu", "cuda", True, ("gloo", "nccl")),  # FedSEA's deployment: CPU clients, GPU servers
    ("auto", "cpu", "cuda", False, ("gloo", "nccl")),  # decided by the config, not by this node
    ("auto", "auto", "cuda", True, ("gloo", "nccl")),  # mixed: auto clients mean CPU
    ("auto", "cuda", "cuda", True, ("nccl", "nccl")),
    ("gloo", "auto", "auto", True, ("gloo", "gloo")),
    ("gloo", "cuda", "cpu", True, ("gloo", "gloo")),
])
def test_the_backend_follows_the_config(backend, client, server, gpu, expect):
    assert backends(backend, client, server, gpu) == expect


def _resolve(backend, client, server, *, server_rank, gpu, local_rank=0, count=2):
    return resolve(backend, client, server, server=server_rank, rank=5, local_rank=local_rank,
                   cuda_available=gpu, device_count=count if gpu else 0)


def test_cpu_clients_stage_through_host_memory_and_gpu_servers_compute_on_their_gpu():
    c = _resolve("auto", "cpu", "cuda", server_rank=False, gpu=False)
    assert (c.compute, c.wire, c.backend) == (torch.device("cpu"), torch.device("cpu"), "gloo")
    s = _resolve("auto", "cpu", "cuda", server_rank=True, gpu=True, local_rank=3)
    assert (s.compute, s.wire, s.server_backend) == (torch.device("cuda", 1), torch.device("cpu"), "nccl")
    every = _resolve("auto", "auto", "auto", server_rank=True, gpu=True, local_rank=1)
    assert every.compute == every.wire == torch.device("cuda", 1) and every.backend == "nccl"
    cpu = _resolve("auto", "auto", "auto", server_rank=False, gpu=False)
    assert cpu.compute == cpu.wire == torch.device("cpu") and cpu.backend == "gloo"


def test_a_gpu_this_rank_lacks_and_cpu_under_nccl_are_errors_naming_the_key():
    with pytest.raises(DeviceError, match=r"^topology.server_device: cuda, but rank 5 sees no GPU.*allowed"):
        _resolve("auto", "cpu", "cuda", server_rank=True, gpu=False)
    with pytest.raises(DeviceError, match=r"^topology.client_device: cpu, but comm.backend is nccl"):
        _resolve("nccl", "cpu", "auto", server_rank=False, gpu=True)
    with pytest.raises(ConfigError, match=r"^topology.client_device: cpu, but comm.backend is nccl"):
        load_config(None, ["comm.backend=nccl", "topology.client_device=cpu"])
    with pytest.raises(ConfigError, match="topology.server_device"):
        load_config(None, ["topology.server_device=tpu"])


@pytest.mark.multirank
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without a GPU gives")
def test_asking_for_a_gpu_on_a_machine_without_one_is_exit_2_on_every_rank(mpiexec_path, tmp_path):
    proc = run_fedsea(["topology.clients=2", "topology.servers=1", "topology.server_device=cuda",
                       f"run.output_dir={tmp_path / 'out'}"], n=3, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stdout + proc.stderr
    assert "fedsea: error: topology.server_device: cuda, but rank 2 sees no GPU" in err
    assert "Traceback" not in err
