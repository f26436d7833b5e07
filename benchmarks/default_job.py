"""The README's default job, recorded: ``launch/local.sh`` with no arguments, as a user runs it.

Runs ``configs/default.yaml`` under ``mpiexec -n <ranks it needs>`` (3 clients + 1 server rank,
the CLI's thread default), on a quiet machine when it can wait for one, and records the loss curve, wall
time, step time, bytes and the machine in JSON; prints a one-row markdown table.

    python benchmarks/default_job.py --out benchmarks/results/default_job.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, least_disturbed_run, machine_info  # noqa: E402
from _common import mpiexec as _mpiexec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/default_job.json")
    ap.add_argument("--wait-quiet", type=float, default=60.0, help="wait this long at most for idle cores")
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--max-foreign", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME="lo")
    env.pop("OMP_NUM_THREADS", None)
    with tempfile.TemporaryDirectory(prefix="fedsea_default_") as tmp:
        odir = Path(tmp) / "run"
        ranks = subprocess.run([sys.executable, "-m", "fedsea_hpc", "ranks", "--config", "configs/default.yaml"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        cmd = [_mpiexec(), "-n", ranks, sys.executable, "-m", "fedsea_hpc", "train", "--config",
               "configs/default.yaml", "run.progress=false", "run.log_every=20", f"run.output_dir={odir}"]

        def finish(run: dict, out: Path) -> None:
            s = json.loads((out / "summary.json").read_text())
            run["summary"] = {k: s[k] for k in ("steps", "first_loss", "final_loss", "wall_time_s",
                                                "mean_step_time_s", "bytes_sent_total", "tokens_total")}
            run["summary"]["losses"] = s["losses"]

        run = least_disturbed_run("default", cmd, env, odir, args, {"config": "configs/default.yaml"}, finish)
    run["command"] = ["mpiexec", "-n", ranks, "python", *run["command"][4:-1]]  # without local paths
    s = run["summary"]
    print("| steps | loss first → last | training wall s | ms/step | process wall s (incl. start-up) |")
    print("|---:|---|---:|---:|---:|")
    print(f"| {s['steps']} | {s['first_loss']:.2f} → {s['final_loss']:.2f} | {s['wall_time_s']:.1f} | "
          f"{s['mean_step_time_s'] * 1e3:.0f} | {run['process_wall_s']:.0f} |")
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(), "run": run}
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
