"""The wire probe: each client measures latency and throughput to its server once, at start.

After every rank has built its part, each client and its server exchange a few small CONTROL
messages (round trip: latency = the fastest round trip / 2) and then one payload the size of a
full micro-batch of hidden states, answered by a one-element ack (time per byte = (that time −
the fastest round trip) / bytes). A server probes its clients one after the other. The messages
travel the same channel and transport as training, so they measure what a step will see,
emulated link delays included (:mod:`fedsea_hpc.adapt.emulate`). Their bytes are reported apart
(``summary.json`` → ``wire_probe``), not in any step's ``bytes_sent``.
"""
from __future__ import annotations

import time

import torch

from fedsea_hpc.transport.wire import Expect, Kind

PINGS = 5
PAYLOADS = 2
_PING = Expect(torch.int64, (1,))


def probe_client(link, emu, payload_elems: int, device: torch.device, times: dict) -> tuple[float, float]:
    """Client side: returns (latency s, seconds per byte) on its link to its server."""
    ping = torch.zeros(1, dtype=torch.int64, device=device)
    rtts = []
    for _ in range(PINGS):
        t0 = time.perf_counter()
        link.send(Kind.CONTROL, ping, 0)
        emu.message(ping, times=times)
        link.recv(Kind.CONTROL, 0, _PING)
        emu.message(ping, times=times)
        rtts.append(time.perf_counter() - t0)
    rtt = min(rtts)
    payload = torch.zeros(payload_elems, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(PAYLOADS):
        t0 = time.perf_counter()
        link.send(Kind.CONTROL, payload, 0)
        emu.message(payload, times=times)
        link.recv(Kind.CONTROL, 0, _PING)
        emu.message(ping, times=times)
        best = min(best, time.perf_counter() - t0)
    nbytes = payload.numel() * payload.element_size()
    return rtt / 2, max(best - rtt, 0.0) / nbytes


def probe_server(links: dict, payload_elems: int, device: torch.device) -> None:
    """Server side: answer each of its clients' probes, one client after the other."""
    ack = torch.zeros(1, dtype=torch.int64, device=device)
    for c in sorted(links):
        link = links[c]
        for _ in range(PINGS):
            link.recv(Kind.CONTROL, 0, _PING)
            link.send(Kind.CONTROL, ack, 0)
        for _ in range(PAYLOADS):
            link.recv(Kind.CONTROL, 0, Expect(torch.float32, (payload_elems,)))
            link.send(Kind.CONTROL, ack, 0)


def probe_bytes(payload_elems: int) -> int:
    """Payload bytes one client's probe puts on the wire, both directions (headers excluded)."""
    return 2 * PINGS * 8 + PAYLOADS * (payload_elems * 4 + 8)
