#!/usr/bin/env bash
# The GPU check in one command, for a lent accelerator (about 8 minutes of device time):
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu_check/)
# 1. the CUDA tests (fused Triton step against the default path, the NCCL-facing collectives);
# 2. bench_optim on CUDA: SM3 fused and default vs Adam fused and foreach, Transformer-base and -Big;
# 3. the sharded benchmark on one GPU (NCCL, one rank), when scripts/bench_sharded.py is present;
# 4. train.py optim=sm3 model=transformer on the built-in data for 4 minutes, with its BLEU.
# Every step writes its log under OUT_DIR; one failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
py() { uv run --quiet python "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then echo "ok"; else echo "FAILED (see $out/$name.log)"; status=1; fi
  tail -n 5 "$out/$name.log"
}
step tests 150 uv run --quiet pytest -q tests/sm3 tests/test_ddp.py -k "cuda or triton or backends"
step bench_optim 150 py scripts/bench_optim.py --device cuda --model both --rounds 10 --out "$out/bench_optim.md"
if [ -f scripts/bench_sharded.py ]; then
  step bench_sharded 90 uv run --quiet torchrun --standalone --nproc_per_node=1 scripts/bench_sharded.py \
    --device cuda --out "$out/bench_sharded.md"
fi
step train 300 py train.py optim=sm3 model=transformer logger=none trainer.progress=false trainer.max_minutes=4 \
  hydra.run.dir=/tmp/gpu_check_train  # checkpoints stay off OUT_DIR (at most 8 files come back)
cp /tmp/gpu_check_train/summary.json "$out/train_summary.json" 2>/dev/null
exit $status
