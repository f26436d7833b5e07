# Sourced by launch/local.sh and launch/test.sh: create/refresh the project venv and activate it.
# Every install is constrained by launch/constraints.txt, the exact stack the results were
# measured on (all packages but torch).
#   FEDSEA_VENV        venv directory (default: .venv in the repo)
#   FEDSEA_CONSTRAINTS torch's constraints file (default: launch/constraints-cpu.txt, the CPU
#                      build 2.13.0); set it empty on a GPU cluster to keep your own CUDA torch.
#   FEDSEA_EXTRAS      extras to install (default: mpich,test; drop mpich where the cluster has MPI)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDSEA_VENV:-$repo/.venv}"
constraints="${FEDSEA_CONSTRAINTS-$repo/launch/constraints-cpu.txt}"
stack="$repo/launch/constraints.txt"
extras="${FEDSEA_EXTRAS-mpich,test}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[fedsea] creating venv $venv" >&2
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.fedsea-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || [ "$stack" -nt "$stamp" ] \
   || { [ -n "$constraints" ] && [ "$constraints" -nt "$stamp" ]; }; then
  echo "[fedsea] installing fedsea-hpc[$extras] into $venv" >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q -c "$stack" ${constraints:+-c "$constraints"} -e "$repo${extras:+[$extras]}"
  # DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~35 s, per venv). Do it
  # here, once, so no job spends its startup (and its peers' patience) compiling.
  python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || true
  touch "$stamp"
fi
