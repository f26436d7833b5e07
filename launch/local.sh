#!/usr/bin/env bash
# Run a job on this machine: launch/local.sh [train|generate|eval] [--config FILE] [section.key=value ...]
# With no arguments: the default training job (configs/default.yaml); `generate` defaults to
# configs/generate.yaml, `eval` to configs/default.yaml (give it an eval set: data.eval_fraction=...).
# Sets up .venv on first use.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. launch/setup_venv.sh
job=train
if [ "${1-}" = train ] || [ "${1-}" = generate ] || [ "${1-}" = eval ]; then job="$1"; shift; fi
args=("$@")
if [[ " ${args[*]-} " != *" --config "* ]]; then
  args=(--config "configs/$([ "$job" = generate ] && echo generate || echo default).yaml" "${args[@]}")
fi
read -r ranks restarts < <(python -m fedsea_hpc ranks --with-restarts --for "$job" "${args[@]}") || exit 2
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
if [ "$ranks" = 1 ]; then
  exec python -m fedsea_hpc "$job" "${args[@]}"
fi
# The MPICH wheel's mpiexec needs no flags; Open MPI as root needs these two.
mpi_flags=()
if mpiexec --version 2>/dev/null | grep -qi "open mpi"; then mpi_flags=(--allow-run-as-root --oversubscribe); fi
[ "$job" = train ] || restarts=0
# run.max_restarts: a failed training job starts again from its last checkpoint (launch/restarts.sh).
. launch/restarts.sh
rc=0
run_with_restarts "$restarts" 0 mpiexec "${mpi_flags[@]}" -n "$ranks" python -m fedsea_hpc "$job" "${args[@]}" || rc=$?
exit "$rc"
