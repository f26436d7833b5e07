#!/usr/bin/env bash
# Shared body of slurm/train.sbatch, generate.sbatch and eval.sbatch: slurm/job.sh {train|generate|eval} [args]
# Environment knobs: FEDSEA_IFNAME (network interface for gloo/NCCL, e.g. ib0), MASTER_PORT,
# FEDSEA_VENV / FEDSEA_CONSTRAINTS / FEDSEA_EXTRAS (see launch/setup_venv.sh; on a GPU cluster
# use FEDSEA_CONSTRAINTS= to keep the site's CUDA torch, FEDSEA_EXTRAS=test to skip the MPICH wheel).
set -euo pipefail
job="$1"
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
. launch/setup_venv.sh
# Rank 0 of the job runs on the first node of the allocation; every task reads the same value.
# (scontrol where present, else fedsea's own parser of the compressed list: slurm/master_addr.sh)
MASTER_ADDR="$(bash slurm/master_addr.sh)" || exit 2
export MASTER_ADDR
# One port per job (fedsea_hpc.distributed.env.slurm_port: the same rule for a bare srun).
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
if [ -n "${FEDSEA_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME="$FEDSEA_IFNAME" NCCL_SOCKET_IFNAME="$FEDSEA_IFNAME"
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--config "configs/$([ "$job" = generate ] && echo generate || echo default).yaml")
read -r need restarts < <(python -m fedsea_hpc ranks --with-restarts --for "$job" "${args[@]}") || exit 2
if [ "$need" != "${SLURM_NTASKS:-}" ]; then
  echo "fedsea: error: the config needs $need ranks (topology.clients + topology.servers), the job has ${SLURM_NTASKS:-?} tasks" >&2
  exit 2
fi
[ "$job" = train ] || restarts=0
# run.max_restarts: a failed step starts again inside this allocation from the last checkpoint
# (launch/restarts.sh). A requeued job (SLURM_RESTART_COUNT > 0) resumes with run.resume=auto.
# --kill-on-bad-exit: one failed rank ends the whole step instead of leaving peers waiting.
. launch/restarts.sh
rc=0
run_with_restarts "$restarts" "${SLURM_RESTART_COUNT:-0}" srun --kill-on-bad-exit=1 python -m fedsea_hpc "$job" "${args[@]}" || rc=$?
# 75: the ranks were signalled (USR1 before the time limit, see train.sbatch; TERM on preemption)
# and saved a checkpoint. Put the job back in the queue to continue, unless FEDSEA_REQUEUE=0.
if [ "$rc" = 75 ] && [ "$job" = train ] && [ "${FEDSEA_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "[fedsea] stopped with a checkpoint: requeueing job $SLURM_JOB_ID to continue (run.resume=auto)" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
