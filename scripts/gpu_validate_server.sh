#!/usr/bin/env bash
# The GPU validation of vllm=server (issue 4): `make serve` on GPU 0, GRPO on GPU 1, 25 steps on a
# Qwen2-0.5B-shaped random model; each run's metrics.jsonl (logp gap, sync seconds per step), the server's
# log and a markdown summary go to $OUT.
#   bash scripts/gpu_validate_server.sh [extra Hydra overrides...]
#   RUNS="full bf16wire lora dpo" SERVE_GPUS=0 TRAINER_GPUS=1 DP=1 ...   (the defaults)
#   SERVE_GPUS=0,1 DP=2 TRAINER_GPUS=2 RUNS=full ...                  (two servers, on a 3+ GPU machine)
set -euo pipefail
OUT=${OUT:-/tmp/gpu-validate-server}
SERVE_GPUS=${SERVE_GPUS:-0}
TRAINER_GPUS=${TRAINER_GPUS:-1}
DP=${DP:-1}
DP_MODE=${DP_MODE:-processes}
PORT=${PORT:-8000}
RUNS=${RUNS:-"full bf16wire lora dpo"}
MODEL_DIR=${MODEL_DIR:-/tmp/qwen2-0.5b-random}
mkdir -p "$OUT"

# The server must hold the very model the trainer starts from (weights and tokenizer).
[[ -f $MODEL_DIR/config.json ]] || python scripts/build_random_model.py model=qwen2_0.5b_random --out "$MODEL_DIR"

MODEL=$MODEL_DIR GPUS=$SERVE_GPUS DP=$DP DP_MODE=$DP_MODE PORT=$PORT MEM=0.5 MAX_LEN=1024 \
  bash scripts/serve.sh > "$OUT/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true' EXIT
if [[ $DP_MODE == native || $DP == 1 ]]; then urls="http://127.0.0.1:$PORT"
else urls=$(for ((i = 0; i < DP; i++)); do printf "http://127.0.0.1:%d," $((PORT + i)); done); urls=${urls%,}; fi

# The trainer waits for the servers' /health itself (vllm.connect_timeout_s), so the runs start right away.
COMMON=(model=qwen2_0.5b_random model.random_init=null "model.name_or_path=$MODEL_DIR" hardware=1gpu
        vllm=server "vllm.base_urls=[$urls]" logger=none rewards=[digits] max_steps=25
        prompts_per_step=16 micro_batch_size=32 sampling.max_completion_length=32 "$@")
run() {
  local name=$1; shift
  local dir=/tmp/runs-server/$name
  CUDA_VISIBLE_DEVICES=$TRAINER_GPUS python train.py "${COMMON[@]}" "$@" "hydra.run.dir=$dir" > "$OUT/$name.log" 2>&1 \
    || { tail -50 "$OUT/$name.log"; tail -30 "$OUT/serve.log"; exit 1; }
  cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  grep -E "NCCL weight transfer|Done in|Mean reward" "$OUT/$name.log" | tail -3
}
for name in $RUNS; do
  case $name in
    full) run full optim.lr=1e-3 ;;  # fp32 master weights pushed as fp32
    bf16wire) run bf16wire optim.lr=1e-3 vllm.transfer_dtype=bfloat16 ;;  # half the bytes
    lora) run lora model.lora.enabled=true optim.lr=2e-2 \
            'model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]' ;;
    dpo) run dpo algo=dpo prompts_per_step=64 optim.lr=1e-3 ;;  # a preference algorithm on the server: 64 pairs
    *) echo "unknown run $name (full, bf16wire, lora, dpo)"; exit 2 ;;
  esac
done
python scripts/summarize_metrics.py "$OUT"/*.metrics.jsonl > "$OUT/summary.md"
cat "$OUT/summary.md"
