#!/usr/bin/env bash
# The 2-GPU validation of issue 8 (nvidia-h200-x2): GRPO on a Qwen2-0.5B-shaped random model with vLLM
# colocated, the same global batch (16 prompts x 8 samples) in three layouts:
#   ref1  one GPU (hardware=1gpu), the reference curve
#   ddp   accelerate launch --num_processes 2, hardware=2gpu_ddp (8 prompts per rank, a vLLM engine per rank)
#   fsdp2 accelerate launch --num_processes 2, hardware=2gpu_fsdp2 (weights and optimizer state halved)
# metrics.jsonl of each run, its log and summary.md (curves side by side, throughput per GPU) go to $OUT.
#   RUNS="ref1 ddp" bash scripts/gpu_validate_multigpu.sh [extra Hydra overrides...]
set -euo pipefail
OUT=${OUT:-/tmp/gpu-validate-multigpu}
STEPS=${STEPS:-24}
mkdir -p "$OUT"
COMMON=(model=qwen2_0.5b_random vllm=colocate logger=none rewards=[digits] max_steps="$STEPS"
        prompts_per_step=16 micro_batch_size=32 sampling.max_completion_length=32 optim.lr=1e-3
        vllm.gpu_memory_utilization=0.3 vllm.sleep_level=1 eval_every=0 "$@")
finish() {  # keep what the run wrote, print its last lines
  local name=$1 dir=$2
  cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  grep -E "Done in" "$OUT/$name.log" | tail -1
}
single() {
  local name=$1; shift
  local dir=/tmp/runs/$name
  CUDA_VISIBLE_DEVICES=0 python train.py "${COMMON[@]}" hardware=1gpu "$@" "hydra.run.dir=$dir" \
    > "$OUT/$name.log" 2>&1 || { tail -60 "$OUT/$name.log"; exit 1; }
  finish "$name" "$dir"
}
ranks() {
  local name=$1 hardware=$2; shift 2
  local dir=/tmp/runs/$name
  CUDA_VISIBLE_DEVICES=0,1 accelerate launch --multi_gpu \
    --num_processes 2 train.py "${COMMON[@]}" "hardware=$hardware" "$@" "hydra.run.dir=$dir" \
    > "$OUT/$name.log" 2>&1 || { tail -80 "$OUT/$name.log"; exit 1; }
  finish "$name" "$dir"
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.csv"
RUNS=${RUNS:-"ref1 ddp fsdp2"}
for name in $RUNS; do
  case $name in
    ref1) single ref1 ;;
    ddp) ranks ddp 2gpu_ddp ;;
    fsdp2) ranks fsdp2 2gpu_fsdp2 ;;
    *) echo "unknown run $name (ref1, ddp, fsdp2)"; exit 2 ;;
  esac
done
python scripts/summarize_metrics.py "$OUT"/*.metrics.jsonl > "$OUT/summary.md"
python - "$OUT" >> "$OUT/summary.md" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
gpus = {"ref1": 1, "ddp": 2, "fsdp2": 2}
print("\n| run | GPUs | reward, steps 1-5 | reward, last 5 | step s (median) | completion tok/s | tok/s per GPU | logp gap mean (max) |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("*.metrics.jsonl")):
    name = path.name.split(".")[0]
    steps = [json.loads(line) for line in path.read_text().splitlines() if "reward/total_mean" in line]
    rewards = [m["reward/total_mean"] for m in steps]
    step_s = sorted(m["time/step_s"] for m in steps[1:])  # the first step compiles / warms up
    tok_s = sorted(m["perf/completion_tokens_per_s"] for m in steps[1:])
    gaps = [m.get("sync/logp_gap_mean", float("nan")) for m in steps]
    n = gpus.get(name, 1)
    print(f"| {name} | {n} | {sum(rewards[:5]) / 5:.3f} | {sum(rewards[-5:]) / 5:.3f} | {step_s[len(step_s) // 2]:.2f} | "
          f"{tok_s[len(tok_s) // 2]:.0f} | {tok_s[len(tok_s) // 2] / n:.0f} | {sum(gaps) / len(gaps):.4f} ({max(gaps):.4f}) |")
PY
cat "$OUT/summary.md"
