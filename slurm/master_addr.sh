#!/usr/bin/env bash
# Print the first host of SLURM_JOB_NODELIST (Slurm runs task 0 there): slurm/job.sh's MASTER_ADDR.
# Uses scontrol where there is one (FEDSEA_SCONTROL=none skips it); else, as in containers and
# tests, fedsea's own parser (fedsea_hpc/distributed/nodelist.py). A list neither can read: exit 2.
set -euo pipefail
list="${SLURM_JOB_NODELIST:-}"
if [ -z "$list" ]; then
  echo "fedsea: error: SLURM_JOB_NODELIST: not set; run inside a Slurm allocation (sbatch, salloc, srun)" >&2
  exit 2
fi
if [ "${FEDSEA_SCONTROL:-}" != none ] && command -v scontrol >/dev/null 2>&1; then
  if first="$(scontrol show hostnames "$list" 2>/dev/null | head -n 1)" && [ -n "$first" ]; then
    echo "$first"
    exit 0
  fi
fi
exec python -m fedsea_hpc hostnames --first --what SLURM_JOB_NODELIST "$list"
