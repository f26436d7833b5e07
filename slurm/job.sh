#!/usr/bin/env bash
# Shared body of slurm/train.sbatch and slurm/generate.sbatch: slurm/job.sh {train|generate} [args]
# Environment knobs: FEDSEA_IFNAME (network interface for gloo/NCCL, e.g. ib0), MASTER_PORT,
# FEDSEA_VENV / FEDSEA_CONSTRAINTS / FEDSEA_EXTRAS (see launch/setup_venv.sh; on a GPU cluster
# use FEDSEA_CONSTRAINTS= to keep the site's CUDA torch, FEDSEA_EXTRAS=test to skip the MPICH wheel).
set -euo pipefail
job="$1"
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
. launch/setup_venv.sh
# Rank 0 of the job runs on the first node of the allocation; every task reads the same value.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
if [ -n "${FEDSEA_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME="$FEDSEA_IFNAME" NCCL_SOCKET_IFNAME="$FEDSEA_IFNAME"
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--config "configs/$([ "$job" = train ] && echo default || echo generate).yaml")
need="$(python -m fedsea_hpc ranks --for "$job" "${args[@]}")"
if [ "$need" != "${SLURM_NTASKS:-}" ]; then
  echo "fedsea: error: the config needs $need ranks (topology.clients + topology.servers), the job has ${SLURM_NTASKS:-?} tasks" >&2
  exit 2
fi
# --kill-on-bad-exit: one failed rank ends the whole step instead of leaving peers waiting.
srun --kill-on-bad-exit=1 python -m fedsea_hpc "$job" "${args[@]}"
