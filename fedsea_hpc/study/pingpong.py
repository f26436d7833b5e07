"""A ping-pong between two fresh processes on this machine, each on its own core where it can.

``fedsea report --project`` needs a link model. A run's own start-up probe
(:mod:`fedsea_hpc.adapt.probe`) measured its links while the ranks competed for cores, and an
oversubscribed run's round trip then includes waiting for the core; this measures the same
probe (same channels, same messages, gloo over loopback TCP) with the two processes pinned to
two different cores: the link a job on this machine would see with a core per rank.

``python -m fedsea_hpc.study.pingpong`` prints ``{"latency_s": .., "s_per_byte": ..}``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PAYLOAD_ELEMS = 1 << 18  # 1 MiB of float32: the size of a small micro-batch of hidden states
TIMEOUT_S = 120


def _worker() -> None:
    import torch
    import torch.distributed as dist

    from fedsea_hpc.adapt.emulate import Emulator
    from fedsea_hpc.adapt.probe import probe_client, probe_server
    from fedsea_hpc.transport.p2p import ByteCounter, Channel

    rank = int(os.environ["RANK"])
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[rank]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    link = Channel(1 - rank, counter=ByteCounter(), max_bytes=PAYLOAD_ELEMS * 4, timeout_s=60)
    cpu = torch.device("cpu")
    best = None
    for _ in range(3):  # the fastest of three probes: the link, not a scheduling hiccup
        if rank == 0:
            lat, spb = probe_client(link, Emulator(), PAYLOAD_ELEMS, cpu, {"emulated_link_s": 0.0})
            best = (lat, spb) if best is None else (min(best[0], lat), min(best[1], spb))
        else:
            probe_server({0: link}, PAYLOAD_ELEMS, cpu)
    dist.barrier()
    if rank == 0:
        print(json.dumps({"latency_s": best[0], "s_per_byte": best[1], "cores": len(cores)}), flush=True)
    dist.destroy_process_group()


def measure() -> dict:
    """Run the two processes; ``{"latency_s", "s_per_byte", "cores", "source"}``."""
    from fedsea_hpc.distributed.env import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-m", "fedsea_hpc.study.pingpong"], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"the ping-pong did not finish within {TIMEOUT_S} s") from None
    if any(p.returncode for p in procs):
        err = next(o[1] for p, o in zip(procs, outs) if p.returncode).strip().splitlines()
        raise RuntimeError(f"the ping-pong failed: {err[-1] if err else 'no message'}")
    res = json.loads(outs[0][0].strip().splitlines()[-1])
    pinned = "each on its own core" if res["cores"] >= 2 else "sharing this machine's only core"
    res["source"] = f"measured by the report: gloo ping-pong between two processes on this machine, {pinned}"
    return res


if __name__ == "__main__":
    _worker()
