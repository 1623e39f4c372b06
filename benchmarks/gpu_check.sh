#!/usr/bin/env bash
# The CUDA paths on a machine with a GPU, in under 10 minutes: benchmarks/gpu_check.py (training
# throughput against a plain data-on-GPU loop, the flagship end to end with CUDA latency of every
# stage, CUDA/CPU parity; on full MNIST when KDCOMPRESS_DATA is set), then torchrun with NCCL.
# Writes the reports under $OUT (default ./gpu_check).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to PyTorch here: nothing to check"; exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
export PYTHONUNBUFFERED=1
t0=$SECONDS
python3 benchmarks/gpu_check.py --device cuda --out "$OUT"
echo "rc=$? gpu_check.py: $((SECONDS - t0)) s"
t0=$SECONDS
python3 -m torch.distributed.run --nproc-per-node 1 -m kdcompress run pipelines/tt_distill_quant.py \
  --device cuda --fresh --until student_kd --out "$OUT/torchrun-nccl"
echo "rc=$? torchrun nccl until student_kd: $((SECONDS - t0)) s"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for run in ("flagship", "torchrun-nccl"):
    path = Path(sys.argv[1]) / run / "report.json"
    if not path.is_file():
        print(run, "no report"); continue
    doc = json.loads(path.read_text())
    print(run, "device", doc["device"], "world_size", doc["world_size"], "failed", doc["failed"])
    for r in doc["stages"]:
        cuda = r.get("latency_ms_cuda") or {}
        print(f"  {r['name']:<11} val {r['val_accuracy']} test {r['accuracy']} "
              f"cpu b64 {r['latency_ms']['batch_64']['p50']} ms "
              f"cuda b1/b64 {cuda.get('batch_1', {}).get('p50')}/"
              f"{cuda.get('batch_64', {}).get('p50')} ms seconds {r['seconds']}")
PY
