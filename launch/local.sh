#!/usr/bin/env bash
# Run a job on this machine: launch/local.sh [--config FILE] [section.key=value ...]
# With no arguments: the default job (configs/default.yaml). Sets up .venv on first use.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. launch/setup_venv.sh
args=("$@")
if [[ " ${args[*]-} " != *" --config "* ]]; then
  args=(--config configs/default.yaml "${args[@]}")
fi
ranks="$(python -m fedsea_hpc ranks "${args[@]}")"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
if [ "$ranks" = 1 ]; then
  exec python -m fedsea_hpc train "${args[@]}"
fi
# The MPICH wheel's mpiexec needs no flags; Open MPI as root needs these two.
mpi_flags=()
if mpiexec --version 2>/dev/null | grep -qi "open mpi"; then mpi_flags=(--allow-run-as-root --oversubscribe); fi
exec mpiexec "${mpi_flags[@]}" -n "$ranks" python -m fedsea_hpc train "${args[@]}"
