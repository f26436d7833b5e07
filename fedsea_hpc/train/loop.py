"""The training loop of the split modes (``parallel``, ``sequential``): one role per rank.

Per step every rank adds its numbers to two small world all-reduces (sums and maxima), so rank
0 can log job-wide loss, tokens, bytes and phase times, and so a stop request (SIGTERM) reaches
every rank at the same step boundary. A dead rank is found by the heartbeat
(:mod:`fedsea_hpc.distributed.liveness`) within ``comm.timeout_s``.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import fedsea_hpc
from fedsea_hpc.adapt.costs import CostMeter, job_costs
from fedsea_hpc.adapt.emulate import Emulator, emulation_report
from fedsea_hpc.adapt.memory import static_memory
from fedsea_hpc.adapt.rebalance import Rebalancer
from fedsea_hpc.adapt.probe import probe_bytes, probe_client, probe_server
from fedsea_hpc.components import checkpoint, footprint, saving
from fedsea_hpc.components.checkpoint import Resume
from fedsea_hpc.components.links import noise_report
from fedsea_hpc.components.metrics import BYTE_KEYS, PHASES, MetricsLog
from fedsea_hpc.components.outputs import save_atomically, write_json, write_text_atomically
from fedsea_hpc.config import Config
from fedsea_hpc.distributed import reduce
from fedsea_hpc.distributed.devices import Devices
from fedsea_hpc.distributed.env import say, store_barrier
from fedsea_hpc.distributed.process import StopRequest
from fedsea_hpc.distributed.topology import Role, Topology
from fedsea_hpc.model.adapters import PARTITION_FILE, save_adapter
from fedsea_hpc.trace import OTHER, STEP, TRACE, gather
from fedsea_hpc.train import evaluation
from fedsea_hpc.train.client import ClientWorker
from fedsea_hpc.transport.p2p import ByteCounter
from fedsea_hpc.transport.wire import Expect


PREEMPTED = "preempted"  # train_split's answer when a signal stopped it (the rank exits EXIT_PREEMPTED)


def _fault_injection(cfg: Config, rank: int, step: int) -> None:
    """debug.fail_rank / fail_step (only in a launcher's first attempt, ``FEDSEA_ATTEMPT`` unset
    or 0, so that a restarted job gets past the fault as after a real one) and debug.stall_*."""
    if cfg.debug.fail_rank == rank and cfg.debug.fail_step == step and saving.first_attempt():
        print(f"[rank {rank}] debug.fail_rank: exiting abruptly at step {step}", flush=True)
        os._exit(3)
    if cfg.debug.stall_rank == rank and cfg.debug.stall_step == step:
        say(f"[rank {rank}] debug.stall_rank: sleeping {cfg.debug.stall_s:g} s at step {step} (EMULATED slow peer)")
        time.sleep(cfg.debug.stall_s)


def train_split(cfg: Config, topo: Topology, source, dtype: torch.dtype,
                devices: Devices, resume: Resume | None = None, data=None) -> dict | None:
    """Run ``cfg.train.steps`` steps on this rank; rank 0 returns the summary.

    ``devices``: where this rank computes (``compute``) and where its messages and world
    collectives are staged (``wire``: the CPU under gloo, the local GPU under NCCL, which only
    moves CUDA tensors; :mod:`fedsea_hpc.distributed.devices`). ``resume``: the checkpoint to continue
    from (:mod:`fedsea_hpc.components.checkpoint`): parts, optimizers, data position, RNG streams,
    partition and metrics rows come from it, and the loop starts at its step. ``data``: a client
    rank's (training set, eval set or None) (:func:`fedsea_hpc.components.setup.load_data`)."""
    device, wire = devices.compute, devices.wire
    counter = ByteCounter()
    stop = StopRequest()  # SIGTERM/SIGUSR1: checkpoint at the next step boundary, then exit 75
    if topo.rank == 0 and topo.clients == 2 and cfg.federated.avg_every > 0:
        say("fedsea: warning: federated.avg_every: with 2 clients each one learns the other's update from the "
            "sum (sum minus its own), with or without federated.secure_aggregation; with peft.lora_r=0 that "
            "includes embedding gradients, whose rows name the other client's tokens. Use LoRA or >= 3 clients.")
    splits = resume.splits if resume is not None else cfg.splits()
    common = dict(splits=splits, train=cfg.train, peft=cfg.peft, comm=cfg.comm, seed=cfg.run.seed)
    if topo.role is Role.CLIENT:
        worker = ClientWorker(topo, source, counter, dtype, device, wire, **common, privacy=cfg.privacy,
                              data=data, secure_aggregation=cfg.secure_aggregation(),
                              dump_aggregation=(cfg.run.output_dir, cfg.debug.dump_aggregation_steps),
                              emulator=Emulator.for_client(cfg.emulate, topo.client_index))
    else:
        from fedsea_hpc.train.server import ServerWorker  # DeepSpeed is imported on servers only

        worker = ServerWorker(topo, source, counter, dtype, device, wire, **common, deepspeed=cfg.deepspeed,
                              dump_wire=(cfg.run.output_dir, cfg.debug.dump_wire_steps),
                              start=checkpoint.consolidated_start(resume, topo.servers, cfg.deepspeed.zero_stage))
    log = MetricsLog(cfg.run, cfg.train, enabled=topo.rank == 0,
                     rows=list(resume.rows) if resume is not None else None)
    saver = saving.Saver(cfg, topo)
    parallel = cfg.train.mode == "parallel"
    avg_every = cfg.federated.avg_every
    fedsgd = parallel and avg_every == 1
    meter = CostMeter(topo.rank, topo.world_size)
    server_rank_of = [topo.server_of(c) for c in range(topo.clients)]
    store_barrier("fedsea/parts-ready", topo.world_size, cfg.comm.startup_timeout_s)  # start the clock together
    payload = cfg.train.micro_batch_size * cfg.train.seq_len * source.config.hidden_size
    if topo.role is Role.CLIENT:  # static memory per block (adapt.memory), the activations are measured
        meter.static = static_memory(source.config, dtype, cfg.peft.lora_r, cfg.peft.target_modules)
    if topo.role is Role.CLIENT:  # the wire probe: latency and throughput of each client's link
        meter.set_link(*probe_client(worker.link, worker.emu, payload, device, dict.fromkeys(PHASES, 0.0)))
    else:
        probe_server(worker.links, payload, device)
    bytes_per_row_token = source.config.hidden_size * torch.empty(0, dtype=dtype).element_size()
    costs = None
    rebalancer = Rebalancer(cfg, source.config.num_hidden_layers, topo.assignment)
    if resume is not None:
        rebalancer.follow((splits, topo.assignment))
        rebalancer.records = list(resume.meta["rebalances"])
    start = resume.step if resume is not None else 0
    rows = [cfg.train.micro_batch_size] * topo.clients  # samples per step per client: the merge weights
    note: dict = {}  # what the next metrics row reports about a repartition
    load_s = None
    if resume is not None:  # last before the loop: the probe above draws from the RNG streams it restores
        t_load = time.perf_counter()
        worker.load_checkpoint(resume)
        load_s = _slowest(time.perf_counter() - t_load, wire)
        if topo.rank == 0:
            say(f"resumed from {resume.path} at step {resume.step} (loaded in {load_s:.2f} s)")
    saves: list[dict] = []  # rank 0: seconds and bytes of every checkpoint this launch wrote
    setup_s = _slowest(time.perf_counter() - fedsea_hpc.STARTED, wire)
    if topo.rank == 0:
        say(f"set-up {setup_s:.1f} s (slowest rank: imports, model, DeepSpeed, probes{', resume' if resume else ''}); "
            f"training steps {start + 1}..{cfg.train.steps}")
    log.start()
    if cfg.run.trace:  # t = 0 of the trace on every rank (fedsea_hpc.trace)
        dist.barrier()
        TRACE.begin(topo.rank, _role_label(topo), torch.get_num_threads())
    world = list(range(topo.world_size))
    t_start = time.perf_counter()
    for step in range(start, cfg.train.steps):
        _fault_injection(cfg, topo.rank, step)
        if rebalancer.due(step):
            new, rec = rebalancer.decide(step, costs, topo.rank, wire)
            if new is not None:
                t_move, moving = time.perf_counter(), TRACE.stamp()
                if list(new[0]) != rebalancer.splits:
                    worker.repartition(new[0], rows)
                if list(new[1]) != topo.assignment:  # a client changes server: only the links move
                    topo.place(new[1])
                    worker.relink()
                    server_rank_of = [topo.server_of(c) for c in range(topo.clients)]
                dist.barrier()  # migrate_s covers the slowest rank's rebuild (the server's engine)
                rebalancer.follow(new)
                TRACE.close(moving, "repartition (split.rebalance)", OTHER, step=step + 1)
                if topo.rank == 0:
                    note["rebalance"] = rebalancer.applied(rec, new, time.perf_counter() - t_move)
            elif topo.rank == 0:
                note["rebalance_decision"] = rec
        times = dict.fromkeys(PHASES, 0.0)
        sent_before = counter.totals()["sent"]
        t0, stamp = time.perf_counter(), TRACE.stamp()
        loss_sum = n_tok = samples = 0.0
        if topo.role is Role.CLIENT:
            batch = worker.next_batch()
            n_local = batch.num_loss_tokens
            samples = batch.input_ids.shape[0]
            if parallel:  # the loss is a mean over every client's tokens: their count, summed
                tok = torch.tensor([float(n_local)], device=wire)
                pending = dist.all_reduce(tok, group=topo.client_group, async_op=True)  # overlaps A forward

                def norm() -> float:  # wanted first by Part C's backward
                    with TRACE.collective("loss tokens all-reduce (clients)", topo.client_ranks, 4):
                        pending.wait()
                    return max(tok.item(), 1.0)
            else:  # sequential: wait for our turn, then a purely local step
                worker.link.recv_control(step, Expect(torch.int64, (1,)))
                norm = max(float(n_local), 1.0)
            loss_sum = worker.run_step(batch, step, norm, times)
            norm = worker.loss_norm
            n_tok = float(n_local)
            worker.optimizer_step(fedsgd=fedsgd, grad_scale=norm / max(n_local, 1) if parallel else 1.0,
                                  times=times)
            if not fedsgd and avg_every > 0 and (step + 1) % avg_every == 0:
                worker.fedavg(times)
        elif parallel:
            worker.serve(topo.clients_of(topo.rank), step, times)
            worker.optimizer_step(times)
        else:
            for c in range(topo.clients):  # one client at a time; idle servers run a dummy row
                mine = topo.server_of(c) == topo.rank
                if mine:
                    worker.links[c].send_control(torch.ones(1, dtype=torch.long, device=device), step)
                worker.serve([c] if mine else [], step, times)
                worker.optimizer_step(times)
        if topo.role is Role.CLIENT:
            p, q = worker.split
            meter.observe_client(step, a_phase_s=worker.a_phase_s, p=p, q=q, row_tokens=worker.row_tokens,
                                 saved_a=worker.saved_a, saved_c=worker.saved_c,
                                 # sync_s waits on peers; the link is wire_s's (from the probe)
                                 compute_s=times["client_compute_s"] + times["optim_s"] - times["emulated_link_s"])
        else:
            meter.observe_server(step, compute_s=worker.measured_s, row_token_blocks=worker.row_token_blocks)
            worker.measured_s, worker.row_token_blocks = 0.0, 0
        sent_after = counter.totals()["sent"]
        sums = torch.tensor([loss_sum, n_tok, samples] + [sent_after[k] - sent_before[k] for k in BYTE_KEYS],
                            dtype=torch.float64, device=wire)
        per_client = torch.zeros(2 * topo.clients, dtype=torch.float64, device=wire)  # loss sum, tokens
        if topo.role is Role.CLIENT:
            per_client[worker.index], per_client[topo.clients + worker.index] = loss_sum, n_tok
        base = 3 + len(BYTE_KEYS)
        # One world reduce per step carries everything: the sums, the cost model's slots, and each
        # rank's maxima in its own slot (a sum of one-hot slots is a gather: max taken here).
        local = torch.tensor([time.perf_counter() - t0] + [times[p] for p in PHASES] + [saver.busy(), stop.requested],
                             dtype=torch.float64, device=wire)
        slots = torch.zeros(topo.world_size, local.numel(), dtype=torch.float64, device=wire)
        slots[topo.rank] = local
        sums = torch.cat([sums, per_client, meter.slot_vector(device=wire), slots.reshape(-1)])
        with TRACE.collective("metrics all-reduce", world, sums.numel() * 8):
            reduce.sum_(sums)  # one round trip on gloo (fedsea_hpc.distributed.reduce)
        maxima = sums[-slots.numel():].view_as(slots).amax(0)
        sums = sums[:-slots.numel()]
        costs = job_costs(sums[base + 2 * topo.clients:].cpu(), topo.clients, server_rank_of, bytes_per_row_token)
        loss_c, tok_c = sums[base:base + topo.clients].tolist(), sums[base + topo.clients:base + 2 * topo.clients].tolist()
        note["client_loss"] = [ls / max(t, 1.0) for ls, t in zip(loss_c, tok_c)]
        stopping = bool(maxima[-1] > 0)  # did any rank get SIGTERM/SIGUSR1?
        saver.boundary(step + 1, anyone_busy=bool(maxima[-2] > 0))  # is any rank still writing a checkpoint?
        # The step's wall time on this rank, its closing reduce included (the ranks leave it together).
        maxima[0] = time.perf_counter() - t0
        maxima = maxima[:-2]
        TRACE.close(stamp, f"step {step + 1}", STEP, step=step + 1)
        if topo.rank == 0 and (measured := rebalancer.observe(step, float(maxima[0]))):
            note["rebalance_measured"] = measured
        log.step(step, sums[:base].cpu(), maxima.cpu(), costs=costs, extra=note)
        note = {}
        if evaluation.due(cfg, step + 1) and not (stopping and step + 1 < cfg.train.steps):
            log.eval(evaluation.evaluate_split(cfg, topo, worker, counter, wire, step + 1))
        if saver.due(step + 1) or (stopping and step + 1 < cfg.train.steps):
            t_save = time.perf_counter()
            path = saver.save(step + 1, worker, _checkpoint_meta(cfg, topo, rebalancer, resume), log.all_rows)
            save_s = time.perf_counter() - t_save  # what training waits for: the snapshot (and an unfinished save)
            if topo.rank == 0:
                saves.append({"step": step + 1, "path": path, "save_s": round(save_s, 4),
                              "waited_for_previous_s": round(saver.waited_s, 4)})
                say(f"checkpoint: {path} (snapshot in {save_s:.2f} s, written in the background)")
            if stopping:
                saver.finish(step + 1)
                log.close()
                if topo.rank == 0:
                    say(f"fedsea: stopped on a signal after step {step + 1} of {cfg.train.steps}; "
                        f"continue with run.resume=auto (or run.resume={path})")
                stop.restore()
                _write_trace(cfg, topo)
                dist.barrier()
                return PREEMPTED
    saver.finish(cfg.train.steps)  # the last checkpoint's files written and published
    wall = time.perf_counter() - t_start
    _save_outputs(cfg, topo, worker)
    _write_trace(cfg, topo)
    dist.barrier()
    return log.finish(wall, extra=_data_stats(topo, worker, wire) | noise_report(cfg.privacy)
                      | {"secure_aggregation": cfg.secure_aggregation()} | emulation_report(cfg.emulate)
                      | _probe_report(costs, probe_bytes(payload)) | rebalancer.finish()
                      | _checkpoint_report(saves, saver, resume, load_s) | {"setup_s": round(setup_s, 3)}
                      | footprint.world_report(topo, device, wire, _part_bytes(topo, worker)))


def _role_label(topo: Topology) -> str:
    return f"client {topo.client_index}" if topo.role is Role.CLIENT else f"server {topo.server_index}"


def _write_trace(cfg: Config, topo: Topology) -> None:
    """run.trace: every rank's events into run.output_dir/trace.json (collective over the world)."""
    if not cfg.run.trace:
        return
    path = os.path.join(cfg.run.output_dir, "trace.json")
    from fedsea_hpc.study.machine import machine_info

    text = gather(topo.rank, {"job": "train", "config": cfg.to_dict(), "machine": machine_info()})
    if topo.rank == 0:
        write_text_atomically(path, text)
        say(f"trace: {path} (open in https://ui.perfetto.dev or chrome://tracing)")


def _part_bytes(topo: Topology, worker) -> dict:
    opt = worker.opt if topo.role is Role.CLIENT else worker.engine.optimizer
    return footprint.part_bytes(worker.model, worker.params, opt)


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _checkpoint_report(saves: list[dict], saver: saving.Saver, resume: Resume | None,
                       load_s: float | None) -> dict:
    """summary.json's ``checkpoints``: what this launch saved (step, the stall, when it was
    complete, bytes) and loaded."""
    if not saves and resume is None:
        return {}
    for s in saves:
        s["published_after_step"] = saver.published.get(s["step"])  # written in the background until then
        s["bytes"] = checkpoint.size_bytes(s["path"]) if os.path.isdir(s["path"]) else None  # if still kept
    return {"checkpoints": {"saved": saves, "resumed_from": None if resume is None else resume.path,
                            "resumed_at_step": None if resume is None else resume.step,
                            "load_s": None if load_s is None else round(load_s, 4)}}


def _checkpoint_meta(cfg: Config, topo: Topology, rebalancer: Rebalancer, resume: Resume | None) -> dict:
    """What rank 0 writes into a checkpoint's meta.json besides the step."""
    silos = resume.silos if resume is not None else list(range(topo.clients))
    return {"clients": topo.clients, "silos": silos, "shards": resume.shards if resume is not None else topo.clients,
            "servers": topo.servers, "zero_stage": cfg.deepspeed.zero_stage,
            "mode": cfg.train.mode, "splits": [list(x) for x in rebalancer.splits], "placement": topo.assignment,
            "rebalances": rebalancer.records, "config": cfg.to_dict()}


def _probe_report(costs: dict | None, nbytes: int) -> dict:
    """What the start-up wire probe found per client (its bytes are in no step's bytes_sent)."""
    if costs is None:
        return {}
    return {"wire_probe": {"latency_s": costs["link_latency_s"], "s_per_byte": costs["link_s_per_byte"],
                           "payload_bytes_per_client": nbytes}}


def _data_stats(topo: Topology, worker, device: torch.device) -> dict:
    """Truncation counts summed over clients (every rank joins the reduce)."""
    t = torch.zeros(2, dtype=torch.float64, device=device)
    if topo.role is Role.CLIENT:
        t[0], t[1] = worker.data.truncated_sequences, worker.data.truncated_tokens
    dist.all_reduce(t)
    return {"truncated_sequences": int(t[0]), "truncated_tokens": int(t[1])}


def _save_outputs(cfg: Config, topo: Topology, worker) -> None:
    root = os.path.join(cfg.run.output_dir, "adapters")
    if topo.role is Role.CLIENT:
        save_atomically(os.path.join(root, f"client{topo.client_index}"), lambda d: save_adapter(worker.model, d))
        if topo.rank == 0:  # generation reads the partition the parts were saved at (it may have moved)
            write_json(os.path.join(root, PARTITION_FILE), {"splits": [list(x) for x in worker.splits]})
        return
    import deepspeed

    # Under ZeRO-3 parameters are partitioned: gather them on every server rank, save on one.
    with deepspeed.zero.GatheredParameters([p for _, p in worker.params], modifier_rank=None,
                                           enabled=cfg.deepspeed.zero_stage == 3):
        if topo.rank == topo.server_ranks[0]:
            save_atomically(os.path.join(root, "server"), lambda d: save_adapter(worker.model, d))
