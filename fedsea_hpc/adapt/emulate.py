"""EMULATION of heterogeneous clients on one machine: slower compute, slower links.

Everything here is emulated, never measured, and is labelled so in ``summary.json`` and the
metrics (``phase_s.emulated_compute_s``, ``phase_s.emulated_link_s``). A client with
``emulate.client_slowdown`` factor f sleeps (f − 1) × each compute phase it just measured, so the
phase takes f times as long. A client with ``emulate.link_mbps`` / ``emulate.link_latency_ms``
delays every message it sends until a link of that speed would have carried it (latency +
bytes × 8 / rate), and sleeps the same after every message it receives (the sender's message
has then arrived when the emulated link would have delivered it, as the client was already
waiting). All of it runs on the client rank, so a server serving several clients is never held
up by one client's emulated link. The rest of the job (timers, the cost model, the planner)
sees these delays as real costs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedsea_hpc.transport.wire import HEADER_BYTES


@dataclass(frozen=True)
class Emulator:
    slowdown: float = 1.0  # compute takes this many times as long
    link_mbps: float = 0.0  # 0 = no emulated bandwidth limit
    latency_ms: float = 0.0

    @classmethod
    def for_client(cls, emulate, client: int) -> Emulator:
        """This client's factors from the ``emulate`` config section (empty lists = none)."""
        pick = lambda xs, default: float(xs[client]) if xs else default  # noqa: E731
        return cls(pick(emulate.client_slowdown, 1.0), pick(emulate.link_mbps, 0.0),
                   pick(emulate.link_latency_ms, 0.0))

    @property
    def active(self) -> bool:
        return self.slowdown != 1.0 or self.link_mbps > 0 or self.latency_ms > 0

    def stretch(self, compute_s: float, times: dict) -> None:
        """After a compute phase that took ``compute_s``: sleep (slowdown − 1) × it."""
        extra = (self.slowdown - 1.0) * compute_s
        if extra > 0:
            time.sleep(extra)
            times["emulated_compute_s"] += extra

    def link_delay_s(self, nbytes: int) -> float:
        return self.latency_ms / 1e3 + (nbytes * 8 / (self.link_mbps * 1e6) if self.link_mbps > 0 else 0.0)

    def message(self, *tensors: torch.Tensor, times: dict) -> None:
        """One message per tensor crossed the emulated link (each with its wire header)."""
        if self.link_mbps <= 0 and self.latency_ms <= 0:
            return
        delay = sum(self.link_delay_s(t.numel() * t.element_size() + HEADER_BYTES) for t in tensors)
        time.sleep(delay)
        times["emulated_link_s"] += delay


def emulation_report(emulate) -> dict:
    """What ``summary.json`` records: the emulated factors, under a key that says so."""
    on = {k: list(getattr(emulate, k)) for k in ("client_slowdown", "link_mbps", "link_latency_ms")
          if getattr(emulate, k)}
    return {"emulated": on} if on else {}
