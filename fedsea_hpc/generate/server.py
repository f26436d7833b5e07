"""A server rank during generation: Part B for all its clients, one KV cache per round.

A *round* starts when the rank has no sequence in flight: it asks every client still running
for its next batch (CONTROL [B]; 0 = that client is done for good), left-pads the prompt hidden
states of all answering clients to a common length T and stacks them into one client-batch
[ΣB, T, H] with one ``DynamicCache``. Each later tick it receives one [B_c, 1, H] per client of
the round, runs one forward on [ΣB, 1, H] and returns each client its rows. A client whose batch
ended sends a zero-row activation; its rows are dropped from the cache. The round (and its cache)
ends when all its clients' batches have ended; then the next round starts.

Lockstep (ZeRO-3 gathers parameters collectively inside every forward): each tick, after
receiving, the server ranks all-reduce (MAX over the server group) "I have rows to run" and "I
still have clients". If anyone has rows, every rank makes exactly one forward call (a rank
without rows runs one dummy row, since Llama attention fails on an empty batch); if nobody has
rows but someone has clients, nobody runs; if no rank has clients left, the loop ends.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from fedsea_hpc.config import Config
from fedsea_hpc.distributed.env import store_barrier
from fedsea_hpc.distributed.topology import Topology
from fedsea_hpc.engine.gen_client import STAT_KEYS, finish_stats
from fedsea_hpc.engine.generate import CachedPartB, load_adapter, new_cache
from fedsea_hpc.model.partition import build_part, server_layers
from fedsea_hpc.transport.p2p import ByteCounter, Channel


def _left_pad(h: torch.Tensor, t: int) -> torch.Tensor:
    """[B, T', H] → [B, t, H] with zeros in front (left padding, masked by the lengths)."""
    return torch.nn.functional.pad(h, (0, 0, t - h.shape[1], 0))


class GenServer:
    def __init__(self, cfg: Config, topo: Topology, source, dtype: torch.dtype, device: torch.device):
        self.cfg, self.topo, self.dtype, self.device = cfg, topo, dtype, device
        g = cfg.generate
        n_layers = source.config.num_hidden_layers
        splits = [cfg.split_for(c) for c in range(cfg.topology.clients)]
        self.layer_ids = server_layers(n_layers, splits)
        self.spans = {c: (p, n_layers - q) for c, (p, q) in enumerate(splits)}
        self.uniform = len(set(self.spans.values())) == 1
        self.part = build_part(source, self.layer_ids, embed=False, head=False, dtype=dtype).to(device)
        model = load_adapter(self.part, os.path.join(g.adapters_dir, "server") if g.adapters_dir else None)
        self.net = CachedPartB(self.part, model).eval()
        self.forward = self.net
        if cfg.deepspeed.zero_stage == 3:
            # Only ZeRO-3 shards parameters; stages 0-2 shard optimizer state, which inference has none of.
            import deepspeed

            from fedsea_hpc.distributed.deepspeed_glue import confine_to_group
            from fedsea_hpc.distributed.topology import ServerMPU
            from fedsea_hpc.engine.server import deepspeed_config

            confine_to_group(topo.server_group, topo.server_ranks)
            engine, *_ = deepspeed.initialize(model=self.net, mpu=ServerMPU(topo), config=deepspeed_config(cfg, dtype))
            engine.eval()
            self.forward = engine
        self.hidden = source.config.hidden_size
        self.counter = ByteCounter()
        max_bytes = int(cfg.comm.max_message_mb * 2**20)
        self.links = {c: Channel(c, counter=self.counter, max_bytes=max_bytes, timeout_s=cfg.comm.timeout_s,
                                 device=device) for c in topo.clients_of(topo.rank)}
        self.s = dict.fromkeys(self.links, 0)  # per-client exchange counter (header step)
        self.running = list(self.links)  # clients that may still send batches
        self.round: list[dict] = []  # clients of the current round: {"c", "n" [B_c], "rows"}
        self.cache = None
        self.t = self.k = 0  # round's padded prompt length, decode steps so far
        self.ticks = self.dummy_ticks = 0

    def _active_rows(self) -> dict[int, torch.Tensor] | None:
        if self.uniform:
            return None
        owners = [e["c"] for e in self.round for _ in range(e["rows"])]
        return {i: torch.tensor([self.spans[c][0] <= i < self.spans[c][1] for c in owners], device=self.device)
                for i in self.layer_ids}

    def _receive(self) -> list[torch.Tensor]:
        """This tick's inputs, one per client of the round (updates the round)."""
        if not self.round:  # a new round: who has a batch?
            hs = []
            for c in list(self.running):
                b = int(self.links[c].recv_control(self.s[c])[0])
                if b == 0:
                    self.running.remove(c)
                    continue
                n = self.links[c].recv_lengths(self.s[c])
                hs.append(self.links[c].recv_activation(self.s[c]))
                self.round.append({"c": c, "n": n.to(self.device), "rows": b})
            self.k = 0
            self.t = max((h.shape[1] for h in hs), default=0)
            self.cache = new_cache(self.part) if hs and self.cfg.generate.kv_cache else None
            return hs
        hs, keep, row = [], [], 0
        for e in list(self.round):
            c = e["c"]
            h = self.links[c].recv_activation(self.s[c])
            if h.shape[0] == 0:  # this client's batch ended
                self.s[c] += 1
                self.round.remove(e)
            else:
                hs.append(h)
                keep += range(row, row + e["rows"])
            row += e["rows"]
        if self.cache is not None and len(keep) < row and keep:
            self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        if not self.round:
            self.cache = None  # round over: free its keys/values
        self.k += 1
        return hs

    def tick(self) -> bool:
        """One lockstep tick; False when every server rank is out of clients."""
        hs = self._receive()
        flags = torch.tensor([float(bool(hs)), float(bool(self.running or self.round))], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.topo.server_group)
        if flags[0] == 0:
            return bool(flags[1])
        self.ticks += 1
        if not hs:  # keep ZeRO-3's collectives in step: one dummy row
            self.dummy_ticks += 1
            x = torch.zeros(1, 1, self.hidden, dtype=self.dtype, device=self.device)
            self.forward(x, torch.ones(1, dtype=torch.long, device=self.device), 0, None, None)
            return True
        n = torch.cat([e["n"] for e in self.round]) + self.k
        if self.cache is not None and self.k > 0:  # a decode step: [ΣB, 1, H] against the cache
            x, past = torch.cat(hs), self.t + self.k - 1
        else:  # the prompt, or (kv_cache=false) the whole sequence again
            x, past = torch.cat([_left_pad(h, self.t + self.k) for h in hs]), 0
        out = self.forward(x.to(self.dtype), n, past, self.cache, self._active_rows())
        for e, h, o in zip(self.round, hs, out.split([e["rows"] for e in self.round])):
            c = e["c"]
            self.links[c].send_activation(o[:, o.shape[1] - h.shape[1]:], self.s[c])
            self.s[c] += 1
        return True


def run_server(cfg: Config, topo: Topology, source, dtype, device) -> dict | None:
    worker = GenServer(cfg, topo, source, dtype, device)
    store_barrier("fedsea/gen-parts-ready", topo.world_size, cfg.comm.startup_timeout_s)
    t0 = time.perf_counter()
    with torch.no_grad():
        while worker.tick():
            pass
    stats = dict.fromkeys(STAT_KEYS, 0.0) | {"server_forwards": worker.ticks, "server_dummy_forwards": worker.dummy_ticks}
    return finish_stats(cfg, topo, device, stats, time.perf_counter() - t0)
