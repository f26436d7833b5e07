#!/usr/bin/env bash
# Run the test suite: launch/test.sh [pytest args]. Sets up .venv on first use (fresh machine OK).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. launch/setup_venv.sh
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec python -m pytest -q -rs "$@"
