#!/usr/bin/env bash
# The GPU path of devices per role, on a machine with a GPU (README, Devices per role): CPU
# clients with a GPU server on SmolLM2 in bf16, split vs centralized in fp32 on the GPU, a
# generation run (tests/test_gpu.py), then one timed bf16 run; results and the card go to
# benchmarks/results/gpu/. Run from the repository root after launch/setup_venv.sh:
#   FEDSEA_CONSTRAINTS= bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=benchmarks/results/gpu
mkdir -p "$out"
python - > "$out/card.json" <<'PY'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, indent=1))
PY
python -m fedsea_hpc fetch-model smollm2 --dest models/smollm2-135m-instruct > /dev/null
set +e
python -m pytest -q -m gpu tests/test_gpu.py --junitxml="$out/test_gpu.xml" 2>&1 | tee "$out/test_gpu.log"
tests_rc=${PIPESTATUS[0]}
set -e
mpiexec -n 3 python -m fedsea_hpc train --config configs/smollm2.yaml topology.client_device=cpu \
    topology.server_device=cuda model.dtype=bfloat16 train.steps=20 run.progress=false \
    run.output_dir=/tmp/fedsea-gpu-check 2>&1 | tail -3
cp /tmp/fedsea-gpu-check/summary.json "$out/smollm2_cpu_clients_gpu_server_bf16_summary.json"
echo "tests exit $tests_rc; results in $out"
exit "$tests_rc"
