"""A server rank: Part B (the middle blocks) under DeepSpeed, serving a fixed set of clients.

All server ranks form one DeepSpeed data-parallel group (ZeRO 0-3). Per round a server rank
receives ``h_A`` from each client it serves this round (real tokens only, packed), unpacks them
into one right-padded client-batch [ΣB, T_max, H], runs one forward, returns each client its
tokens, then runs one backward from the clients' ``dL/dh_B``. ZeRO needs every server rank to
make the same calls each round, so a rank with no client this round (sequential mode) runs a
single dummy row whose output gradient is zero: it touches every layer and joins every
collective, and adds nothing to the gradient.
When the split points move (:mod:`fedsea_hpc.adapt.rebalance`), :meth:`ServerWorker.repartition`
rebuilds the engine over the new block set with every block's trained state.
"""
from __future__ import annotations

import os
import time

import torch

from fedsea_hpc.adapt import migrate
from fedsea_hpc.components.engine import server_engine
from fedsea_hpc.components.links import server_links
from fedsea_hpc.trace import OPTIM, span
from fedsea_hpc.config import CommConfig, DeepSpeedConfig, PeftConfig, TrainConfig
from fedsea_hpc.distributed.deepspeed_glue import full_state, load_optimizer_state, save_checkpoint_snapshot
from fedsea_hpc.distributed.topology import Topology
from fedsea_hpc.model.lora import apply_lora, trainable
from fedsea_hpc.model.partition import ServerSpans, build_part
from fedsea_hpc.transport.p2p import ByteCounter
from fedsea_hpc.transport.wire import Expect, Kind, check_lengths, pack_tokens, unpack_tokens


class ServerWorker:
    """Part B on one server rank: the DeepSpeed engine and the links to the clients it serves,
    computing on ``device`` with its messages staged on ``wire`` (:mod:`fedsea_hpc.distributed.devices`).

    Takes only the config it uses: ``splits`` (every client's (p, q)), ``seed`` for the adapters,
    and ``dump_wire`` = (output dir, steps) of ``debug.dump_wire_steps``.
    """

    def __init__(self, topo: Topology, source, counter: ByteCounter, dtype: torch.dtype, device: torch.device,
                 wire: torch.device, *,
                 splits: list[tuple[int, int]], train: TrainConfig, peft: PeftConfig, deepspeed: DeepSpeedConfig,
                 comm: CommConfig, seed: int, dump_wire: tuple[str, int] = ("", 0),
                 start: migrate.Moved | None = None):
        self.topo, self.dtype, self.device, self.wire = topo, dtype, device, wire
        self.dump_dir, self.dump_steps = dump_wire
        self.source, self.peft, self.train_cfg, self.ds_cfg, self.seed = source, peft, train, deepspeed, seed
        self.measured_s, self.row_token_blocks = 0.0, 0  # real (non-dummy) work this step, for the cost model
        self.splits = [tuple(s) for s in splits]
        self._build(self.splits, start)  # start: a consolidated checkpoint's state (another layout)
        self.hidden = source.config.hidden_size
        self.links = server_links(topo, comm, counter, wire)
        self._comm, self._counter = comm, counter
        # What a client may send: at most a micro-batch of rows of at most seq_len tokens.
        self.expect_lengths = Expect(torch.int64, ((1, train.micro_batch_size),))
        self.max_tokens = train.seq_len

    def _build(self, splits, moved: migrate.Moved | None = None) -> None:
        """Part B for ``splits``: the blocks, LoRA, optimizer and DeepSpeed engine; with ``moved``
        (a migration) every trainable tensor and its AdamW moments start from the moved state."""
        # Blocks client c actually uses on the server: [p_c, L - q_c); the group holds the union.
        self.spans = ServerSpans.from_splits(self.source.config.num_hidden_layers, splits)
        part = build_part(self.source, list(self.spans.layer_ids), embed=False, head=False,
                          dtype=self.dtype).to(self.device)
        self.model = apply_lora(part, self.peft, self.seed)
        self.params = trainable(self.model)
        state = moved.for_part(self.params) if moved is not None else None
        if state is not None:  # values before deepspeed.initialize: every ZeRO stage copies them from here
            with torch.no_grad():
                for name, p in self.params:
                    p.copy_(state[name]["param"].to(p.dtype))
        optimizer = torch.optim.AdamW([p for _, p in self.params], lr=self.train_cfg.lr,
                                      weight_decay=self.train_cfg.weight_decay)
        self.engine = server_engine(self.model, self.topo, self.ds_cfg, self.dtype, optimizer)
        if state is not None:
            load_optimizer_state(self.engine, self.params, state, moved.step)

    def repartition(self, new_splits, rows: list[int]) -> None:
        """Move to ``new_splits`` live (see :mod:`fedsea_hpc.adapt.migrate`): gather the whole
        Part B state, merge the changed blocks with their other copies, rebuild the engine over
        the new block set. Every rank of the job calls its worker's ``repartition`` together."""
        old, step = full_state(self.engine, self.params)  # collective over the server group
        self.engine.destroy()  # ZeRO-3 hooks off the old module before the new engine is built
        moved = migrate.exchange(self.source.config.num_hidden_layers, self.splits, new_splits, rows,
                                 me=migrate.SERVER, contributes=self.topo.rank == self.topo.server_ranks[0],
                                 old_state=old, step=step, named=self.params, topo=self.topo,
                                 dtype=self.dtype, device=self.wire)  # world groups: the wire device
        del self.engine, self.model, self.params
        self.splits = [tuple(s) for s in new_splits]
        self._build(self.splits, moved)

    def save_checkpoint(self, directory: str, writer, where) -> None:
        """The server group's files of a checkpoint: DeepSpeed's own (same layout resumes), the
        consolidated Part B (any layout), this rank's RNG. Collective over the server group.

        ``engine.save_checkpoint`` runs as DeepSpeed has it (its collectives, its file names and
        contents), through a checkpoint engine whose ``save`` hands a snapshot to ``writer``
        instead of writing: the files are written while training goes on."""
        save_checkpoint_snapshot(self.engine, os.path.join(directory, "server"), "ds",
                                 lambda state, path: writer.save(state, path, where))
        full, step = full_state(self.engine, self.params)
        if self.topo.rank == self.topo.server_ranks[0]:
            writer.save({"state": full, "step": step, "splits": self.splits},
                        os.path.join(directory, "server_full.pt"), where)
        writer.save({"torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                    os.path.join(directory, f"server_rng{self.topo.server_index}.pt"), where)

    def load_checkpoint(self, res) -> None:
        """Same server count and ZeRO stage as the checkpoint: DeepSpeed's ``load_checkpoint``
        (bitwise). Otherwise the engine was built from ``server_full.pt`` (``start``) already.
        RNG: this rank's stream where the checkpoint has one for its index."""
        if res.meta["servers"] == self.topo.servers and res.meta["zero_stage"] == self.ds_cfg.zero_stage:
            self.engine.load_checkpoint(res.file("server"), tag="ds", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        rng = res.file(f"server_rng{self.topo.server_index}.pt")
        if os.path.isfile(rng):
            st = torch.load(rng, map_location="cpu", weights_only=False)
            torch.set_rng_state(st["torch_rng"])
            if st["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(st["cuda_rng"], self.device)

    def relink(self) -> None:
        """After ``topo.place``: one link per client this server rank serves now. Part B is the
        same on every server rank, so a client that changes server brings no state with it."""
        self.links = server_links(self.topo, self._comm, self._counter, self.wire)

    def _recv_inputs(self, clients: list[int], step: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(c, lengths [B], packed h_A [sum(lengths), H])`` per client, each checked before it is
        used. Every client's lengths receive is posted first; as each arrives, that client's
        activation receive is posted with its exact shape, so the payload flows at once."""
        pending = {c: self.links[c].irecv(Kind.LENGTHS, step, self.expect_lengths) for c in clients}
        acts = {}
        for c in clients:
            lengths = pending[c].wait()
            check_lengths(lengths, self.max_tokens, self.links[c].peer)
            acts[c] = (lengths, self.links[c].irecv(Kind.ACTIVATION, step,
                                                    Expect(self.dtype, (int(lengths.sum()), self.hidden)), fused=True))
        return [(c, lengths, h.wait().to(self.device)) for c, (lengths, h) in acts.items()]  # off the wire device

    def serve(self, clients: list[int], step: int, times: dict) -> None:
        """One forward/backward round for ``clients`` (possibly empty: a dummy round).

        Clients send only their real tokens; they are unpacked into one right-padded
        client-batch [sum B, T_max, H] here, and each reply and gradient goes back packed."""
        t0 = time.perf_counter()
        recv = self._recv_inputs(clients, step)
        if step < self.dump_steps:
            self._dump(step, {f"client{c}_lengths": n for c, n, _ in recv} | {f"client{c}_activation": h for c, _, h in recv})
        t1 = time.perf_counter()
        if recv:
            lengths = torch.cat([n for _, n, _ in recv]).to(self.device)
            t_max = int(lengths.max())
            x = unpack_tokens(torch.cat([h for _, _, h in recv]), lengths, t_max)
            owners = [c for c, n, _ in recv for _ in range(len(n))]
        else:
            x = torch.zeros(1, 1, self.hidden, dtype=self.dtype, device=self.device)
            lengths, owners = torch.ones(1, dtype=torch.long, device=self.device), []
        x = x.to(self.dtype).requires_grad_(True)
        with span("B forward (DeepSpeed engine)"):
            out = self.engine(x, lengths, self.spans.active_rows(owners, self.device))
        tokens = [h.shape[0] for _, _, h in recv]  # each client's share of the packed tokens
        grads_in, sending = {}, []
        for (c, _, h), o in zip(recv, pack_tokens(out, lengths).split(tokens) if recv else ()):
            grads_in[c] = self.links[c].irecv(Kind.GRADIENT, step, Expect(self.dtype, tuple(h.shape)), fused=True)
            # Every client's reply is posted before any is waited on: none waits for another to read.
            sending.append(self.links[c].isend(Kind.ACTIVATION, o, step, fused=True))
        for handle in sending:
            handle.wait()
        t2 = time.perf_counter()
        grads = []
        for c, _, h in recv:
            g = grads_in[c].wait()
            if step < self.dump_steps:
                self._dump(step, {f"client{c}_gradient": g})
            grads.append(g.to(device=self.device, dtype=out.dtype))
        grad = (unpack_tokens(torch.cat(grads), lengths, out.shape[1]) if grads
                else torch.zeros_like(out))  # a dummy round: zero gradient
        t3 = time.perf_counter()
        # DeepSpeed averages gradients over the server ranks; the loss the clients differentiate
        # is already a global sum, so scale by the group size to keep the sum. dL/dh_A is not
        # averaged by anyone: undo the factor before it goes back (exact for a power of two).
        with span("B backward (DeepSpeed engine.backward)"):
            self.engine.backward((out * grad).sum() * self.topo.servers)
        sending = [self.links[c].isend(Kind.GRADIENT, g / self.topo.servers, step, fused=True)
                   for (c, _, h), g in zip(recv, pack_tokens(x.grad, lengths).split(tokens) if recv else ())]
        for handle in sending:
            handle.wait()
        t4 = time.perf_counter()
        times["server_compute_s"] += (t2 - t1) + (t4 - t3)
        times["wait_clients_s"] += (t1 - t0) + (t3 - t2)
        if recv:  # for the cost model: real work only (a dummy round is lockstep, not load)
            t_max = x.shape[1]
            self.measured_s += (t2 - t1) + (t4 - t3)
            self.row_token_blocks += sum(len(n) * t_max * (self.spans.spans[c][1] - self.spans.spans[c][0])
                                         for c, n, _ in recv)

    @torch.no_grad()
    def eval_rounds(self, counts: list[int], first_step: int) -> None:
        """An eval pass (:mod:`fedsea_hpc.train.evaluation`): ``counts[c]`` eval batches of client c;
        in round r (header step ``first_step + r``) forward what this rank's clients with an r-th
        batch sent, as one client-batch, and return each its h_B; no backward. A round where none
        of its clients has a batch runs the dummy row, so every server rank calls the engine alike."""
        self.engine.eval()
        for r in range(max(counts, default=0)):
            step = first_step + r
            recv = self._recv_inputs([c for c in self.topo.clients_of(self.topo.rank) if r < counts[c]], step)
            if recv:
                lengths = torch.cat([n for _, n, _ in recv]).to(self.device)
                x = unpack_tokens(torch.cat([h for _, _, h in recv]), lengths, int(lengths.max()))
                owners = [c for c, n, _ in recv for _ in range(len(n))]
            else:
                x = torch.zeros(1, 1, self.hidden, dtype=self.dtype, device=self.device)
                lengths, owners = torch.ones(1, dtype=torch.long, device=self.device), []
            with span("B forward, eval (DeepSpeed engine)"):
                out = self.engine(x.to(self.dtype), lengths, self.spans.active_rows(owners, self.device))
            tokens = [h.shape[0] for _, _, h in recv]
            sending = [self.links[c].isend(Kind.ACTIVATION, o, step, fused=True)
                       for (c, _, _), o in zip(recv, pack_tokens(out, lengths).split(tokens) if recv else ())]
            for handle in sending:
                handle.wait()
        self.engine.train()

    def _dump(self, step: int, tensors: dict) -> None:
        """debug.dump_wire_steps: keep exactly what arrived from the clients, for audits and tests."""
        out = os.path.join(self.dump_dir, "wire", f"step{step}")
        os.makedirs(out, exist_ok=True)
        for name, t in tensors.items():
            torch.save(t.cpu(), os.path.join(out, f"{name}.pt"))

    def optimizer_step(self, times: dict) -> None:
        t0 = time.perf_counter()
        with span("DeepSpeed step (part B)", OPTIM):
            self.engine.step()
        times["optim_s"] += time.perf_counter() - t0

