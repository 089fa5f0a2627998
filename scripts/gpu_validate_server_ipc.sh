#!/usr/bin/env bash
# Issue 28, point 5, on ONE GPU: a stock vLLM server (scripts/serve.sh, TRANSFER=ipc, MEM=0.3) and the trainer
# beside it on the same GPU, 20 GRPO steps of a Qwen2-0.5B-shaped random model against that one server,
# on-policy (k0) and off_policy_steps=1, 2 (k1, k2); then, the server stopped, the colocate default (colocate)
# with the same settings. Per run: the logp gap of every step (the run itself stops on an on-policy step over
# vllm.max_logp_gap), sync seconds, rollout staleness, reward first -> last, median s/step, and the GPU memory
# of the server and of the trainer (nvidia-smi every second). To $OUT: summary.md, summary.json, metrics.jsonl
# (every run's steps, each line with its run), memory.csv (the samples) and logs.txt (the logs' ends).
#
#   bash scripts/gpu_validate_server_ipc.sh [extra Hydra overrides for every run...]
#   DRY_RUN=1 bash scripts/gpu_validate_server_ipc.sh        # print the commands, run nothing
#   RUNS="k0 k1 k2 colocate" GPU=0 MEM=0.3 MAX_STEPS=20 LIMIT_S=540 PORT=8000 ...   (the defaults)
#
# The server serves the very model the trainer starts from: one directory (MODEL_DIR), built once by
# scripts/build_random_model.py with the runs' own data (the tokenizer is trained on it), named by both
# (`model.random_init=null model.name_or_path=$MODEL_DIR`). model.compile is off: its first step (25-31 s at
# 0.5B) in four runs would not fit one 10-minute call; the speed with it is the bench's (ours_server*).
# LIMIT_S: a run that could not end before it (RUN_S, 120 s, left) is skipped, one still running at it is
# stopped; the summary is written either way. Needs ray beside vLLM (the bundle's stand-in will do).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-validate-server-ipc}
WORK=${WORK:-/tmp/gpu-validate-server-ipc-work}
GPU=${GPU:-0}
PORT=${PORT:-8000}
MEM=${MEM:-0.3}
MAX_STEPS=${MAX_STEPS:-20}
RUNS=${RUNS:-"k0 k1 k2 colocate"}
MODEL_DIR=${MODEL_DIR:-/tmp/qwen2-0.5b-random}
SERVER_START_S=${SERVER_START_S:-300}
LIMIT_S=${LIMIT_S:-540}
RUN_S=${RUN_S:-120}
DRY_RUN=${DRY_RUN:-0}
started=$(date +%s)
url=http://127.0.0.1:$PORT

show() { echo "+ $(printf '%q ' "$@")"; }
elapsed() { echo $(( $(date +%s) - started )); }

COMMON=(model=qwen2_0.5b_random model.random_init=null "model.name_or_path=$MODEL_DIR" hardware=1gpu
        logger=none 'rewards=[digits]' "max_steps=$MAX_STEPS" prompts_per_step=16 micro_batch_size=32
        sampling.max_completion_length=32 optim.lr=1e-3 eval_every=0 model.compile=false "$@")
train_command() {  # $1: the run; the train.py command line, one word a line
  local name=$1 engine
  case $name in
    k0|k1|k2) engine=(vllm=server "vllm.base_urls=[$url]" "off_policy_steps=${name#k}") ;;
    colocate) engine=(vllm=colocate) ;;  # its defaults: sleep level 2, the KV cache sized to the step
    *) echo "unknown run $name (k0, k1, k2, colocate)" >&2; exit 2 ;;
  esac
  printf '%s\n' python train.py "${COMMON[@]}" "${engine[@]}" "hydra.run.dir=$WORK/runs/$name"
}
build=(python scripts/build_random_model.py model=qwen2_0.5b_random --out "$MODEL_DIR")
serve=(env "MODEL=$MODEL_DIR" "GPUS=$GPU" "PORT=$PORT" "MEM=$MEM" TRANSFER=ipc MAX_LEN=1024 "EXTRA=--dtype bfloat16"
       bash scripts/serve.sh)
summarize=(python scripts/summarize_server_ipc.py "$WORK" --out "$OUT")

server_runs=() other_runs=()
for name in $RUNS; do
  train_command "$name" > /dev/null  # (an unknown name fails here, before anything starts)
  case $name in k*) server_runs+=("$name") ;; *) other_runs+=("$name") ;; esac
done
if [[ $DRY_RUN == 1 ]]; then
  show "${build[@]}"
  show "${serve[@]}"
  for name in $RUNS; do
    mapfile -t command < <(train_command "$name")
    show env "CUDA_VISIBLE_DEVICES=$GPU" "${command[@]}"
  done
  show "${summarize[@]}"
  exit 0
fi

rm -rf "$WORK" && mkdir -p "$WORK/runs" "$OUT"
: > "$WORK/runs.tsv"  # name, start, end, trainer pid, exit status (the summary's index of the runs)
echo "server_up -" > "$WORK/server.txt"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done  # serve.sh's trap stops its server
}
trap cleanup EXIT

# GPU memory every second: the compute apps by pid (the trainer's pid is in runs.tsv; the rest is the server),
# and the whole device (where a container hides the apps' pids: the server alone is its use before a run)
( while true; do
    t=$(date +%s)
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null | sed "s/^/$t,app,/"
    nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | sed "s/^/$t,device,/"
    sleep 1
  done > "$WORK/memory.csv" ) &
pids+=($!)

[[ -f $MODEL_DIR/config.json ]] || "${build[@]}"

stop_server() {
  [[ -n ${serve_pid:-} ]] || return 0
  kill -TERM "$serve_pid" 2>/dev/null || true
  wait "$serve_pid" 2>/dev/null || true
  serve_pid=
}
start_server() {  # serve.sh in the background until /health answers; 1 if it does not within SERVER_START_S
  "${serve[@]}" > "$WORK/serve.log" 2>&1 &
  serve_pid=$!
  pids+=("$serve_pid")
  local since=$(date +%s)
  while (( $(date +%s) - since < SERVER_START_S )); do
    if python -c "import urllib.request as u; u.urlopen('$url/health', timeout=2)" 2>/dev/null; then
      echo "server_up $(date +%s) after $(elapsed) s" > "$WORK/server.txt"
      return 0
    fi
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
  done
  echo "server_failed $(date +%s) (no /health after $(elapsed) s)" > "$WORK/server.txt"
  tail -40 "$WORK/serve.log"
  stop_server
  return 1
}

run() {  # one run, stopped at LIMIT_S; its line in runs.tsv whatever happened
  local name=$1 begin status=0 watchdog
  if (( $(elapsed) + RUN_S > LIMIT_S )); then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" - - - skipped >> "$WORK/runs.tsv"
    echo "$name: skipped, $(elapsed) s of LIMIT_S=$LIMIT_S gone"
    return
  fi
  mapfile -t command < <(train_command "$name")
  begin=$(date +%s)
  CUDA_VISIBLE_DEVICES=$GPU "${command[@]}" > "$WORK/$name.log" 2>&1 &
  local pid=$!
  ( trap 'kill "$nap" 2>/dev/null; exit 0' TERM; sleep $(( LIMIT_S - $(elapsed) )) & nap=$!; wait "$nap"
    kill -TERM "$pid" 2>/dev/null ) &
  watchdog=$!
  wait "$pid" || status=$?
  kill "$watchdog" 2>/dev/null || true
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$begin" "$(date +%s)" "$pid" "$status" >> "$WORK/runs.tsv"
  echo "$name: exit $status after $(( $(date +%s) - begin )) s"
  (( status == 0 )) || tail -30 "$WORK/$name.log"
}

if (( ${#server_runs[@]} )); then
  if start_server; then
    sleep 5  # the server alone on the GPU for a few samples
    for name in "${server_runs[@]}"; do run "$name"; done
  else
    for name in "${server_runs[@]}"; do printf '%s\t-\t-\t-\tno server\n' "$name" >> "$WORK/runs.tsv"; done
  fi
  stop_server
  echo "server_down $(date +%s)" >> "$WORK/server.txt"
fi
for name in "${other_runs[@]}"; do run "$name"; done

{ for log in "$WORK"/*.log; do
    [[ -e $log ]] && { echo "== $log"; tail -n 60 "$log"; }
  done; } > "$OUT/logs.txt" 2>/dev/null || true
cp "$WORK/memory.csv" "$OUT/memory.csv"
"${summarize[@]}"
echo "gpu_validate_server_ipc: $(elapsed) s"
