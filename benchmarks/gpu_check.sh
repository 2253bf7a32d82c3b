#!/usr/bin/env bash
# The device check in one call: a short CUDA training run, evaluation, torchrun with NCCL, then
# bench.py --cuda. Run on a machine with a GPU: bash benchmarks/gpu_check.sh; results go to $OUT
# (default gpu-out/ in the repo root), bench.py's tables into BENCHMARKS.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "
import torch
x = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
print('pinned strides kept:', x.pin_memory().stride() == x.stride(), 'on device channels_last:',
      x.pin_memory().to('cuda', non_blocking=True).is_contiguous(memory_format=torch.channels_last))" | tee -a "$OUT/gpu.txt"
{ time python3 train.py --model resnet18 --epochs 3 --device cuda --quiet ; } 2>&1 | tee "$OUT/train_cuda.log"
python3 evaluate.py checkpoints/resnet18_scratch/best.pt --quiet 2>&1 | tee "$OUT/eval_cuda.log"
python3 evaluate.py checkpoints/resnet18_scratch/best.pt --quiet --device cpu --workers 4 --out "$OUT/eval_on_cpu.json" 2>&1 | head -3 | tee -a "$OUT/eval_cuda.log"
torchrun --standalone --nproc_per_node 1 train.py --epochs 1 --run-name ddp_nccl --quiet 2>&1 | tail -4 | tee "$OUT/ddp.log"
cp logs/*.csv logs/*.json "$OUT/" 2>/dev/null
timeout "${BENCH_TIMEOUT:-330}" python3 bench.py --cuda --out "$OUT/bench_cuda.json" > "$OUT/bench_cuda.md" 2> "$OUT/bench_cuda.err"
echo "bench rc=$?"
tail -5 "$OUT/bench_cuda.err"
cat "$OUT/bench_cuda.md"
