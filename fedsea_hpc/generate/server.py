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

import time

import torch
import torch.distributed as dist

from fedsea_hpc.components.links import server_links
from fedsea_hpc.config import CommConfig, Config, DeepSpeedConfig, GenerateConfig
from fedsea_hpc.distributed.env import store_barrier
from fedsea_hpc.distributed.topology import Topology
from fedsea_hpc.generate.decoding import new_cache
from fedsea_hpc.generate.stats import STAT_KEYS, finish_stats
from fedsea_hpc.model.adapters import load_adapter, part_dir
from fedsea_hpc.model.partition import ServerSpans, build_part
from fedsea_hpc.transport.p2p import ByteCounter
from fedsea_hpc.transport.wire import Expect, WireError, check_lengths


def _left_pad(h: torch.Tensor, t: int) -> torch.Tensor:
    """[B, T', H] → [B, t, H] with zeros in front (left padding, masked by the lengths)."""
    return torch.nn.functional.pad(h, (0, 0, t - h.shape[1], 0))


class GenServer:
    """Part B on one server rank during generation; ``splits`` is every client's (p, q)."""

    def __init__(self, topo: Topology, source, dtype: torch.dtype, device: torch.device, wire: torch.device, *,
                 splits: list[tuple[int, int]], generate: GenerateConfig, deepspeed: DeepSpeedConfig,
                 comm: CommConfig):
        self.topo, self.dtype, self.device = topo, dtype, device
        self.g = g = generate
        self.spans = ServerSpans.from_splits(source.config.num_hidden_layers, splits)
        self.part = build_part(source, list(self.spans.layer_ids), embed=False, head=False, dtype=dtype).to(device)
        # The module that owns the parameters (peft-wrapped when a LoRA adapter is loaded); its
        # forward is PartModel.forward, one call per tick.
        self.forward = load_adapter(self.part, part_dir(g.adapters_dir, "server")).eval()
        if deepspeed.zero_stage == 3:
            # Only ZeRO-3 shards parameters; stages 0-2 shard optimizer state, which inference has none of.
            from fedsea_hpc.components.engine import server_engine

            self.forward = server_engine(self.forward, topo, deepspeed, dtype)
            self.forward.eval()
        self.hidden = source.config.hidden_size
        self.max_tokens = source.config.max_position_embeddings
        self.counter = ByteCounter()
        self.links = server_links(topo, comm, self.counter, wire)
        self.s = dict.fromkeys(self.links, 0)  # per-client exchange counter (header step)
        self.running = list(self.links)  # clients that may still send batches
        self.round: list[dict] = []  # clients of the current round: {"c", "n" [B_c], "rows"}
        self.cache = None
        self.t = self.k = 0  # round's padded prompt length, decode steps so far
        self.ticks = self.dummy_ticks = 0

    def _receive(self) -> list[torch.Tensor]:
        """This tick's inputs, one per client of the round (updates the round)."""
        if not self.round:  # a new round: who has a batch?
            hs = []
            for c in list(self.running):
                link, s = self.links[c], self.s[c]
                b = int(link.recv_control(s, Expect(torch.int64, (1,)))[0])
                if not 0 <= b <= self.g.batch_size:
                    raise WireError(f"bad batch size from rank {link.peer}: {b}, expected 0..{self.g.batch_size}")
                if b == 0:
                    self.running.remove(c)
                    continue
                n = link.recv_lengths(s, Expect(torch.int64, (b,)))
                h = link.recv_activation(s, Expect(self.dtype, (b, (1, self.max_tokens), self.hidden)))
                check_lengths(n, h.shape[1], link.peer)
                hs.append(h.to(self.device))  # off the wire device
                self.round.append({"c": c, "n": n.to(self.device), "rows": b, "t": h.shape[1]})
            self.k = 0
            self.t = max((h.shape[1] for h in hs), default=0)
            self.cache = new_cache(self.part.config) if hs and self.g.kv_cache else None
            return hs
        hs, keep, row = [], [], 0
        for e in list(self.round):
            c = e["c"]
            h = self._recv_decode(e)
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

    def _recv_decode(self, e: dict) -> torch.Tensor:
        """A decode-step input of a round client: [rows, q, H] (q = 1 with the KV cache, else the
        whole sequence so far) or the header-only batch end [0, 1, H]; nothing else."""
        link = self.links[e["c"]]
        q = 1 if self.g.kv_cache else e["t"] + self.k + 1
        h = link.recv_activation(self.s[e["c"]], Expect(self.dtype, ((0, e["rows"]), (1, q), self.hidden)))
        if tuple(h.shape) not in ((0, 1, self.hidden), (e["rows"], q, self.hidden)):
            raise WireError(f"bad decode input from rank {link.peer}: shape {list(h.shape)}, expected "
                            f"[{e['rows']}, {q}, {self.hidden}] or the batch end [0, 1, {self.hidden}]")
        return h.to(self.device)

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
            self.forward(x, torch.ones(1, dtype=torch.long, device=self.device), None, "left")
            return True
        n = torch.cat([e["n"] for e in self.round]) + self.k
        if self.cache is not None and self.k > 0:  # a decode step: [ΣB, 1, H] against the cache
            x, past = torch.cat(hs), self.t + self.k - 1
        else:  # the prompt, or (kv_cache=false) the whole sequence again
            x, past = torch.cat([_left_pad(h, self.t + self.k) for h in hs]), 0
        owners = [e["c"] for e in self.round for _ in range(e["rows"])]
        out = self.forward(x.to(self.dtype), n, self.spans.active_rows(owners, self.device), "left", past, self.cache)
        for e, h, o in zip(self.round, hs, out.split([e["rows"] for e in self.round])):
            c = e["c"]
            self.links[c].send_activation(o[:, o.shape[1] - h.shape[1]:], self.s[c])
            self.s[c] += 1
        return True


def run_server(cfg: Config, topo: Topology, source, dtype, devices) -> dict | None:
    worker = GenServer(topo, source, dtype, devices.compute, devices.wire, splits=cfg.splits(),
                       generate=cfg.generate, deepspeed=cfg.deepspeed, comm=cfg.comm)
    store_barrier("fedsea/gen-parts-ready", topo.world_size, cfg.comm.startup_timeout_s)
    t0 = time.perf_counter()
    with torch.no_grad():
        while worker.tick():
            pass
    stats = dict.fromkeys(STAT_KEYS, 0.0) | {"server_forwards": worker.ticks, "server_dummy_forwards": worker.dummy_ticks}
    return finish_stats(topo, devices.wire, stats, time.perf_counter() - t0, generate=cfg.generate, privacy=cfg.privacy,
                        output_dir=cfg.run.output_dir)
