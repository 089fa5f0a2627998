#!/usr/bin/env bash
# The H200 validation of vllm=colocate (issue 3): 20 GRPO steps on a Qwen2-0.5B-shaped random model
# with sleep level 1, sleep level 2, and LoRA; metrics.jsonl of each run and a markdown summary go to $OUT.
#   bash scripts/gpu_validate_colocate.sh [extra Hydra overrides...]
set -euo pipefail
OUT=${OUT:-/tmp/gpu-validate}
mkdir -p "$OUT"
COMMON=(model=qwen2_0.5b_random hardware=1gpu vllm=colocate logger=none rewards=[digits] max_steps=20
        prompts_per_step=16 algo.num_generations=8 micro_batch_size=32 sampling.max_completion_length=32
        vllm.gpu_memory_utilization=0.3 "$@")
run() {
  local name=$1; shift
  local dir=/tmp/runs/$name
  python train.py "${COMMON[@]}" "$@" "hydra.run.dir=$dir" > "$OUT/$name.log" 2>&1 || { tail -50 "$OUT/$name.log"; exit 1; }
  cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  grep -E "Done in|Mean reward" "$OUT/$name.log" | tail -2
}
RUNS=${RUNS:-"sleep1 sleep2 lora"}  # a subset fits one 10-minute device call
for name in $RUNS; do
  case $name in
    sleep1) run sleep1 vllm.sleep_level=1 optim.lr=1e-3 ;;
    sleep2) run sleep2 vllm.sleep_level=2 optim.lr=1e-3 ;;
    lora) run lora vllm.sleep_level=1 model.lora.enabled=true optim.lr=2e-2 \
            'model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]' ;;
  esac
done
python scripts/summarize_metrics.py "$OUT"/*.metrics.jsonl > "$OUT/summary.md"
cat "$OUT/summary.md"
