#!/usr/bin/env bash
# The GPU check in one command, for a lent accelerator (at most 9.5 minutes, plus the machine's start):
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu_check/)
# 1. the CUDA tests (fused Triton step against the default path, the NCCL-facing collectives);
# 2. bench_optim on CUDA: SM3 fused and default vs Adam fused and foreach, Transformer-base and -Big;
# 3. the sharded benchmark on one GPU (NCCL, one rank), when scripts/bench_sharded.py is present;
# 4. train.py optim=sm3 model=transformer on the built-in data for 2.5 minutes, with its BLEU.
# Every step writes its log under OUT_DIR; one failing step does not stop the others.
# It runs through the python3 on PATH when that already imports torch, hydra and sacrebleu (a GPU
# image with no network), else through uv (which installs the locked environment).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if python3 -c "import torch, hydra, sacrebleu" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  py=(python3)
else
  py=(uv run --quiet python)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then echo "ok"; else echo "FAILED (see $out/$name.log)"; status=1; fi
  tail -n 5 "$out/$name.log"
}
step tests 120 "${py[@]}" -m pytest -q -n 4 tests/sm3 tests/test_ddp.py -k "cuda or triton or backends"
step bench_optim 150 "${py[@]}" scripts/bench_optim.py --device cuda --model both --rounds 10 --out "$out/bench_optim.md"
if [ -f scripts/bench_sharded.py ]; then
  step bench_sharded 60 "${py[@]}" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/bench_sharded.py \
    --device cuda --out "$out/bench_sharded.md"
fi
step train 240 "${py[@]}" train.py optim=sm3 model=transformer logger=none trainer.progress=false trainer.max_minutes=2.5 \
  hydra.run.dir=/tmp/gpu_check_train  # checkpoints stay off OUT_DIR (at most 8 files come back)
cp /tmp/gpu_check_train/summary.json "$out/train_summary.json" 2>/dev/null
exit $status
