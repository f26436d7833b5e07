"""A client rank: Part A (embedding + first blocks) and Part C (last blocks, norm, head, loss).

Token ids, embeddings and labels stay here. Per step the client sends the server the per-sample
lengths and noised ``h_A`` (its real tokens, ``[sum(lengths), H]``), receives ``h_B`` (same
tokens), computes the loss, returns ``dL/dh_B`` and finally receives ``dL/dh_A`` to finish its
own backward pass.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

from fedsea_hpc.adapt import migrate
from fedsea_hpc.adapt.emulate import Emulator
from fedsea_hpc.adapt.memory import SavedBytes
from fedsea_hpc.components.links import client_link, relink_client
from fedsea_hpc.trace import OPTIM, TRACE, span
from fedsea_hpc.config import CommConfig, PeftConfig, PrivacyConfig, TrainConfig
from fedsea_hpc.data.dataset import ClientData
from fedsea_hpc.distributed.topology import Topology
from fedsea_hpc.federated.client_sync import ClientSync
from fedsea_hpc.model.lora import apply_lora, trainable
from fedsea_hpc.model.partition import build_part, client_layers, client_union_layers, loss_sum
from fedsea_hpc.privacy.secure_agg import SecureSum, agree_keys
from fedsea_hpc.transport.p2p import ByteCounter
from fedsea_hpc.transport.wire import Expect, Kind, pack_tokens, unpack_tokens


class ClientWorker:
    """Parts A and C of one client, its data, optimizer, link and aggregation, computing on
    ``device`` with its messages staged on ``wire`` (:mod:`fedsea_hpc.distributed.devices`).

    Takes only the config it uses: ``splits`` (every client's (p, q); the union decides which
    client-side tensors are averaged together), ``data`` (its training set and eval set, or None),
    ``seed`` for its adapters, ``secure_aggregation`` (resolved), and ``dump_aggregation`` = (output dir, steps)
    of ``debug.dump_aggregation_steps``; ``emulator`` this client's EMULATED slowdown and link
    (:mod:`fedsea_hpc.adapt.emulate`; none by default).
    """

    def __init__(self, topo: Topology, source, counter: ByteCounter, dtype: torch.dtype,
                 device: torch.device, wire: torch.device, *, splits: list[tuple[int, int]], train: TrainConfig,
                 peft: PeftConfig, privacy: PrivacyConfig, comm: CommConfig,
                 data: tuple[ClientData, ClientData | None], seed: int,
                 secure_aggregation: bool, dump_aggregation: tuple[str, int] = ("", 0),
                 emulator: Emulator = Emulator()):
        self.topo, self.device, self.wire = topo, device, wire
        self.dump_aggregation = dump_aggregation
        self.emu = emulator
        self.index = topo.client_index
        self.source, self.peft, self.train_cfg, self.seed, self.dtype = source, peft, train, seed, dtype
        self.splits = [tuple(s) for s in splits]
        self._build_part()
        self.link = client_link(topo, comm, privacy, counter, wire, noise_device=device)
        self._comm, self._counter = comm, counter
        self.data, self.eval_data = data  # loaded before the job started (components.setup.load_data)
        self.eval_batches = self.eval_data.eval_batches(train.micro_batch_size) if self.eval_data else []
        self.batches = self.data.batches(train.micro_batch_size)
        self.batches_taken = 0
        self.secure_sum = None
        if secure_aggregation:  # a collective over the client group: every client is here now
            keys = agree_keys(self.index, topo.clients, topo.client_group, wire)
            self.secure_sum = SecureSum(self.index, topo.clients, topo.client_group, keys,
                                        record=dump_aggregation[1] > 0)
        self._build_sync()
        self.samples_since_avg = 0
        self.a_phase_s, self.row_tokens = 0.0, 0
        self.loss_norm = 1.0  # what the last step divided its loss sum by (run_step)
        self.saved_a = self.saved_c = 0  # bytes autograd saved in the A / C forward of the last step

    def _build_part(self, moved: migrate.Moved | None = None) -> None:
        """Parts A + C for this client's (p, q), LoRA and AdamW; with ``moved`` (a migration)
        every trainable tensor and its AdamW moments start from the moved state."""
        n_layers = self.source.config.num_hidden_layers
        p, q = self.splits[self.index]
        self.head_ids = list(range(p))
        self.tail_ids = list(range(n_layers - q, n_layers))
        self.part = build_part(self.source, client_layers(n_layers, p, q), embed=True, head=True,
                               dtype=self.dtype).to(self.device)
        self.model = apply_lora(self.part, self.peft, self.seed)
        self.model.train()
        self.params = trainable(self.model)
        self.opt = torch.optim.AdamW([p for _, p in self.params], lr=self.train_cfg.lr,
                                     weight_decay=self.train_cfg.weight_decay)
        if moved is not None:
            migrate.load_torch_state(self.params, self.opt, moved.for_part(self.params), moved.step)

    def _build_sync(self) -> None:
        """FedAvg/FedSGD slots over the blocks clients hold under the current splits."""
        self.sync = ClientSync(self.params, client_union_layers(self.source.config.num_hidden_layers, self.splits),
                               self.topo.client_group, secure_sum=self.secure_sum)

    def repartition(self, new_splits, rows: list[int]) -> None:
        """Move to ``new_splits`` live (see :mod:`fedsea_hpc.adapt.migrate`): blocks this client
        gives up or takes on are merged with their other copies; the rest keep their state."""
        old, step = migrate.torch_state(self.params, self.opt)
        moved = migrate.exchange(self.source.config.num_hidden_layers, self.splits, new_splits, rows,
                                 me=self.index, contributes=True, old_state=old, step=step, named=self.params,
                                 topo=self.topo, dtype=self.dtype, device=self.wire)  # world groups: the wire device
        self.splits = [tuple(s) for s in new_splits]
        self._build_part(moved)
        self._build_sync()

    def save_checkpoint(self, directory: str, writer, where) -> None:
        """This client's file of a checkpoint (:mod:`fedsea_hpc.components.checkpoint`): snapshot
        now, written by ``writer`` while training goes on."""
        state = {"client": self.index, "splits": self.splits, "batches_taken": self.batches_taken,
                 "samples_since_avg": self.samples_since_avg,
                 "params": {n: p.detach() for n, p in self.params},
                 "optimizer": self.opt.state_dict(), "noise_rng": self.link.generator.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        writer.save(state, os.path.join(directory, f"client{self.index}.pt"), where)

    def load_checkpoint(self, res) -> None:
        """Continue from ``res`` (a :class:`~fedsea_hpc.components.checkpoint.Resume`): every
        trainable tensor, AdamW, the data stream's position, the noise and torch RNG streams."""
        from fedsea_hpc.components.checkpoint import CheckpointError

        path = res.file(f"client{res.sources[self.index]}.pt")  # this silo's file in the checkpoint
        try:
            st = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged file: name it
            raise CheckpointError(f"run.resume: {path}: unreadable ({type(e).__name__}: {e})") from None
        names = [n for n, _ in self.params]
        if sorted(st["params"]) != sorted(names):
            raise CheckpointError(f"run.resume: {path}: holds other tensors than this client's part "
                                  f"({len(st['params'])} vs {len(names)}); was the model or peft.* changed?")
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(st["params"][n].to(p.dtype))
        self.opt.load_state_dict(st["optimizer"])
        self.batches_taken = st["batches_taken"]
        self.batches = self.data.batches(self.train_cfg.micro_batch_size, skip=self.batches_taken)
        self.samples_since_avg = st["samples_since_avg"]
        self.link.generator.set_state(st["noise_rng"])
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rng"], self.device)

    def relink(self) -> None:
        """After ``topo.place``: talk to the server rank that serves this client now."""
        relink_client(self.link, self.topo, self._comm, self._counter, self.wire)

    @property
    def split(self) -> tuple[int, int]:
        """This client's current (p, q)."""
        return self.splits[self.index]

    def next_batch(self):
        batch = next(self.batches).to(self.device)
        self.batches_taken += 1
        self.samples_since_avg += batch.input_ids.shape[0]
        return batch

    def run_step(self, batch, step: int, loss_norm: float | Callable[[], float], times: dict) -> float:
        """Forward + backward of one micro-batch through A → server → C → server → A.

        Only real tokens cross: h_A, h_B and both gradients travel packed as ``[sum(lengths), H]``
        (:func:`~fedsea_hpc.transport.wire.pack_tokens`). Each receive is posted before the send
        it answers, with its exact shape, so every hop takes one round trip and one backend
        operation a side (header and payload fused, :class:`~fedsea_hpc.transport.p2p.Channel`); the lengths go out
        first and their exchange overlaps Part A's forward. The loss is ``sum of token losses /
        loss_norm`` (a number, or a function giving it: asked for only when Part C's backward needs
        it, so a collective behind it overlaps the forward; kept as ``self.loss_norm``); returns
        the (unnormalised) loss sum.
        """
        emu, link, lengths = self.emu, self.link, batch.lengths
        t0 = time.perf_counter()
        sent_lengths = link.isend(Kind.LENGTHS, lengths.to(torch.int64), step)
        with SavedBytes() as saved_a, span("A forward"):  # saved: for split.client_memory_mb (adapt.memory)
            h0 = self.part.embed(batch.input_ids)
            ctx = self.part.context(h0, lengths)  # right-padded, from lengths alone
            h_a = self.part.run_layers(h0, self.head_ids, ctx)
        emu.stretch(time.perf_counter() - t0, times)
        t_a = time.perf_counter()
        t = h_a.shape[1]
        packed_a = pack_tokens(h_a, lengths)
        mine = Expect(h_a.dtype, tuple(packed_a.shape))  # h_B and both gradients: the same tokens
        reply = link.irecv(Kind.ACTIVATION, step, mine, fused=True)
        link.send_activation(packed_a, step, fused=True)  # noised copy; h_a keeps its clean graph
        sent_lengths.wait()
        emu.message(lengths, packed_a, times=times)
        t1 = time.perf_counter()
        packed_b = reply.wait().to(self.device)  # staged on the wire device (host memory under gloo)
        emu.message(packed_b, times=times)
        t2 = time.perf_counter()
        h_b = unpack_tokens(packed_b, lengths, t).requires_grad_(True)
        with span("C forward+loss+backward"):
            with SavedBytes() as saved_c:
                out = self.part.run_layers(h_b, self.tail_ids, ctx)
                total = loss_sum(self.part.head_logits(out), batch.labels)
            self.loss_norm = loss_norm() if callable(loss_norm) else loss_norm
            (total / self.loss_norm).backward()
        emu.stretch(time.perf_counter() - t2, times)
        reply = link.irecv(Kind.GRADIENT, step, mine, fused=True)
        grad_b = pack_tokens(h_b.grad, lengths)
        link.send_gradient(grad_b, step, fused=True)
        emu.message(grad_b, times=times)
        t3 = time.perf_counter()
        g_a = reply.wait().to(self.device)
        emu.message(g_a, times=times)
        t4 = time.perf_counter()
        with span("A backward"):
            h_a.backward(unpack_tokens(g_a.to(h_a.dtype), lengths, t))
        emu.stretch(time.perf_counter() - t4, times)
        t5 = time.perf_counter()
        times["client_compute_s"] += (t1 - t0) + (t3 - t2) + (t5 - t4)  # emulated stretch and link included
        times["wait_server_s"] += (t2 - t1) + (t4 - t3)
        self.a_phase_s = (t_a - t0) + (t5 - t4)  # for the cost model: p blocks, both passes
        self.row_tokens = int(h_a.shape[0] * h_a.shape[1])
        self.saved_a, self.saved_c = saved_a.bytes, saved_c.bytes
        return float(total.detach())

    @torch.no_grad()
    def eval_pass(self, noise: bool, first_step: int) -> tuple[float, int, int]:
        """Forward only over this client's eval set, A → server → C, batch r under header step
        ``first_step + r`` (:mod:`fedsea_hpc.train.evaluation`): (loss sum, loss tokens, samples).
        ``noise``: send h_A noised as in training (privacy.noise_in_eval); else exactly as computed."""
        link, total, tokens, samples = self.link, 0.0, 0, 0
        was = self.model.training
        self.model.eval()
        for r, batch in enumerate(self.eval_batches):
            step, batch = first_step + r, batch.to(self.device)
            lengths = batch.lengths
            sent_lengths = link.isend(Kind.LENGTHS, lengths.to(torch.int64), step)
            h0 = self.part.embed(batch.input_ids)
            ctx = self.part.context(h0, lengths)
            h_a = self.part.run_layers(h0, self.head_ids, ctx)
            packed_a = pack_tokens(h_a, lengths)
            reply = link.irecv(Kind.ACTIVATION, step, Expect(h_a.dtype, tuple(packed_a.shape)), fused=True)
            if noise:
                link.send_activation(packed_a, step, fused=True)
            else:  # the channel itself: the one send that skips privatize, by the config's choice
                link.channel.send(Kind.ACTIVATION, packed_a, step, fused=True)
            sent_lengths.wait()
            h_b = unpack_tokens(reply.wait().to(self.device), lengths, h_a.shape[1])
            out = self.part.run_layers(h_b, self.tail_ids, ctx)
            total += float(loss_sum(self.part.head_logits(out), batch.labels))
            tokens, samples = tokens + batch.num_loss_tokens, samples + batch.input_ids.shape[0]
        self.model.train(was)
        return total, tokens, samples

    def optimizer_step(self, *, fedsgd: bool, grad_scale: float, times: dict) -> None:
        """Sum gradients over clients (FedSGD) or rescale them to a local mean, then step."""
        t0 = time.perf_counter()
        if fedsgd:
            with TRACE.collective("FedSGD gradient sum", self.topo.client_ranks, self.sync.nbytes()):
                self.sync.sum_grads()
        elif grad_scale != 1.0:
            for _, p in self.params:
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        self._dump_aggregation()
        t1 = time.perf_counter()
        with span("optimizer step (AdamW, parts A+C)", OPTIM):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.emu.stretch(time.perf_counter() - t1, times)
        times["sync_s"] += t1 - t0
        times["optim_s"] += time.perf_counter() - t1

    def fedavg(self, times: dict) -> None:
        """Sample-weighted average of the client-side trainable parameters."""
        t0 = time.perf_counter()
        with TRACE.collective("FedAvg", self.topo.client_ranks, self.sync.nbytes()):
            self.sync.average_params(self.samples_since_avg)
        self._dump_aggregation()
        self.samples_since_avg = 0
        times["sync_s"] += time.perf_counter() - t0

    def _dump_aggregation(self) -> None:
        """debug.dump_aggregation_steps: what this client put into the last secure sum."""
        ss, (output_dir, steps) = self.secure_sum, self.dump_aggregation
        if ss is None or not ss.last or ss.calls > steps:
            return
        out = os.path.join(output_dir, "secagg", f"call{ss.calls - 1}")
        os.makedirs(out, exist_ok=True)
        torch.save(ss.last, os.path.join(out, f"client{self.index}.pt"))
        ss.last = {}
