#!/usr/bin/env bash
# The H200 validation of vllm=colocate: 20 steps on a Qwen2-0.5B-shaped random model. GRPO with sleep
# level 1, sleep level 2 and LoRA (issue 3); RLOO, online DPO, Nash-MD and XPO (issue 5); GRPO, RLOO with
# the KL in its reward, GSPO and CISPO side by side (issue 31): RUNS="grpo rloo_kl gspo cispo" MAX_STEPS=30.
# metrics.jsonl of each run and a markdown summary go to $OUT.
#   RUNS="sleep1 rloo dpo" bash scripts/gpu_validate_colocate.sh [extra Hydra overrides...]
set -euo pipefail
OUT=${OUT:-/tmp/gpu-validate}
mkdir -p "$OUT"
COMMON=(model=qwen2_0.5b_random hardware=1gpu vllm=colocate logger=none rewards=[digits] max_steps=${MAX_STEPS:-20}
        prompts_per_step=16 micro_batch_size=32 sampling.max_completion_length=32
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
    grpo) run grpo optim.lr=1e-3 ;;
    rloo) run rloo algo=rloo optim.lr=1e-3 ;;
    rloo_kl) run rloo_kl algo=rloo algo.beta=0.04 optim.lr=1e-3 ;;
    gspo|cispo) run "$name" algo="$name" optim.lr=1e-3 ;;
    # the preference algorithms see a pair per prompt: 64 prompts give a rollout of 128 completions
    dpo|nash_md|xpo) run "$name" algo="$name" prompts_per_step=64 micro_batch_size=32 optim.lr=1e-3 ;;
  esac
done
python scripts/summarize_metrics.py "$OUT"/*.metrics.jsonl > "$OUT/summary.md"
cat "$OUT/summary.md"
