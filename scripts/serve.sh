#!/usr/bin/env bash
# The stock vLLM OpenAI server with vLLM's RL routes and weight transfer, for `python train.py vllm=server`.
#
#   make serve MODEL=Qwen/Qwen2-0.5B-Instruct                     # one server on GPU 0, port 8000
#   make serve MODEL=Qwen/Qwen2.5-7B GPUS=0,1,2,3 TP=2 DP=2       # two servers (GPUs 0,1 and 2,3), ports 8000, 8001
#   make serve MODEL=Qwen/Qwen2-0.5B-Instruct GPUS=0 MEM=0.3 TRANSFER=ipc   # on the trainer's GPU, beside it
#   MODEL=... GPUS=0 PORT=8000 bash scripts/serve.sh               # the same without make
#
# Settings (environment): MODEL (required), GPUS=0, TP=1, DP=1, PORT=8000, HOST=127.0.0.1, MEM= (GPU memory
# share; empty = 0.9, or 0.3 with IPC to leave the trainer the rest), MAX_LEN= (max model length; empty = the
# model's), EXTRA= (more server flags, e.g. "--enforce-eager"), DP_MODE=processes|native,
# TRANSFER=auto|nccl|ipc (below), DRY_RUN=1 (print the commands, start nothing).
#
# TRANSFER: how the trainer's weights reach the server; vLLM 0.26 takes one per server. nccl: a broadcast from
# the trainer's GPU, which must be another one. ipc: the server reads the trainer's buffers in place (CUDA IPC),
# so it must run on the trainer's GPU, alone (TP=DP=1), bound to this host (the handles arrive pickled, which
# needs VLLM_ALLOW_INSECURE_SERIALIZATION=1), with ray installed on both sides (vLLM's IPC module imports it).
# auto: ipc when the server takes every GPU of this host (the trainer can only share it), else nccl.
#
# DP > 1: DP_MODE=processes (the default) starts DP servers on disjoint GPU sets and consecutive ports; the
# trainer splits each rollout across their URLs. DP_MODE=native starts one server with vLLM's own
# --data-parallel-size instead (one URL). vLLM 0.26's code supports the weight-transfer engine under its
# internal data parallelism for dense models (see docs/server-mode.md), but that is not yet validated on GPUs.
#
# Ctrl-C or SIGTERM stops every server this script started.
set -euo pipefail

MODEL=${MODEL:-}
GPUS=${GPUS:-0}
TP=${TP:-1}
DP=${DP:-1}
PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
MEM=${MEM:-}
MAX_LEN=${MAX_LEN:-}
EXTRA=${EXTRA:-}
DP_MODE=${DP_MODE:-processes}
TRANSFER=${TRANSFER:-auto}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}

fail() { echo "serve: $*" >&2; exit 2; }
[[ -n $MODEL ]] || fail "MODEL is required, e.g. make serve MODEL=Qwen/Qwen2-0.5B-Instruct GPUS=0"
[[ $TP =~ ^[1-9][0-9]*$ && $DP =~ ^[1-9][0-9]*$ ]] || fail "TP and DP must be positive integers (TP=$TP DP=$DP)"
[[ $DP_MODE == processes || $DP_MODE == native ]] || fail "DP_MODE must be processes or native, not '$DP_MODE'"
IFS=, read -r -a gpu_list <<< "$GPUS"
needed=$((TP * DP))
(( ${#gpu_list[@]} == needed )) \
  || fail "GPUS=$GPUS lists ${#gpu_list[@]} GPU(s), but TP x DP = $TP x $DP needs $needed, e.g. GPUS=$(seq -s, 0 $((needed - 1)))"

[[ $TRANSFER == auto || $TRANSFER == nccl || $TRANSFER == ipc ]] || fail "TRANSFER must be auto, nccl or ipc, not '$TRANSFER'"
host_gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l || true)
if [[ $TRANSFER == auto ]]; then
  if (( needed == 1 && host_gpus == 1 )); then
    TRANSFER=ipc
    echo "serve: TRANSFER=ipc: GPU $GPUS is this host's only GPU, so the trainer shares it (TRANSFER=nccl to refuse)"
  else
    TRANSFER=nccl
  fi
fi
if [[ $TRANSFER == ipc ]]; then
  (( needed == 1 )) || fail "TRANSFER=ipc serves on the trainer's one GPU: TP and DP must be 1 (TP=$TP DP=$DP); use TRANSFER=nccl on GPUs of their own"
  [[ $HOST == 127.0.0.1 || $HOST == localhost || $HOST == ::1 ]] \
    || fail "TRANSFER=ipc reaches a trainer on this host only, and its pickled handles must not be taken from the network: leave HOST at 127.0.0.1 (HOST=$HOST)"
  if ! "$PYTHON" -c 'import ray' 2>/dev/null; then
    message="TRANSFER=ipc: vLLM 0.26's IPC weight transfer imports ray, which vLLM does not install: pip install -e '.[server]' (or pip install ray), here and where the trainer runs"
    [[ $DRY_RUN == 1 ]] && echo "serve: note: $message" >&2 || fail "$message"
  fi
fi
[[ -n $MEM ]] || { [[ $TRANSFER == ipc ]] && MEM=0.3 || MEM=0.9; }

# What the servers share: vLLM's RL routes (dev mode), the weight-transfer engine, and log-probs of the
# distribution that sampled (after temperature, top-k, top-p), which the trainer compares with its own.
common=(--model "$MODEL" --host "$HOST" --gpu-memory-utilization "$MEM"
        --weight-transfer-config "{\"backend\":\"$TRANSFER\"}" --logprobs-mode processed_logprobs)
environment=(VLLM_SERVER_DEV_MODE=1)
[[ $TRANSFER == ipc ]] && environment+=(VLLM_ALLOW_INSECURE_SERIALIZATION=1)
[[ -n $MAX_LEN ]] && common+=(--max-model-len "$MAX_LEN")
read -r -a extra <<< "$EXTRA"

# One line per server: "CUDA_VISIBLE_DEVICES PORT ARGS..."
plan=()
if (( DP > 1 )) && [[ $DP_MODE == processes ]]; then
  for ((i = 0; i < DP; i++)); do
    devices=$(IFS=,; echo "${gpu_list[*]:$((i * TP)):$TP}")
    plan+=("$devices $((PORT + i)) --tensor-parallel-size $TP")
  done
elif (( DP > 1 )); then
  plan+=("$GPUS $PORT --tensor-parallel-size $TP --data-parallel-size $DP")
else
  plan+=("$GPUS $PORT --tensor-parallel-size $TP")
fi

url_host=$HOST
if [[ $HOST == 0.0.0.0 ]]; then url_host=$(hostname -I 2>/dev/null | awk '{print $1}'); url_host=${url_host:-$(hostname)}; fi
urls=()
for entry in "${plan[@]}"; do
  read -r _ port _ <<< "$entry"
  urls+=("http://$url_host:$port")
done

pids=()
stop_all() {  # $1: the exit status
  trap - INT TERM EXIT
  if (( ${#pids[@]} )); then
    echo "serve: stopping ${#pids[@]} server(s)" >&2
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 60); do  # vLLM shuts its engine and workers down on SIGTERM; give it 30 s
      alive=0
      for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
      (( alive )) || break
      sleep 0.5
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  fi
  exit "$1"
}
trap 'stop_all 130' INT
trap 'stop_all 143' TERM
trap 'stop_all $?' EXIT

for entry in "${plan[@]}"; do
  read -r devices port flags <<< "$entry"
  read -r -a flags <<< "$flags"
  command=(env CUDA_VISIBLE_DEVICES="$devices" "${environment[@]}"
           "$PYTHON" -m vllm.entrypoints.openai.api_server "${common[@]}" --port "$port" "${flags[@]}" "${extra[@]}")
  echo "serve: $(printf '%q ' "${command[@]}")"
  if [[ $DRY_RUN != 1 ]]; then
    setsid "${command[@]}" &  # its own process group, so that stop_all reaches its engine and workers too
    pids+=($!)
  fi
done

list=$(IFS=,; echo "${urls[*]}")
echo "serve: URLs: ${urls[*]} (ready when /health answers; the trainer waits for it)"
if [[ $TRANSFER == ipc ]]; then  # the trainer on the server's GPU
  echo "serve: train on the same GPU with: CUDA_VISIBLE_DEVICES=$GPUS python train.py vllm=server hardware=1gpu 'vllm.base_urls=[$list]'"
else  # the trainer's GPUs: this host's others (NVML order, as CUDA_VISIBLE_DEVICES counts them for vLLM)
  others=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -vxF -f <(tr , '\n' <<< "$GPUS") | paste -sd, || true)
  echo "serve: train with: ${others:+CUDA_VISIBLE_DEVICES=$others }python train.py vllm=server 'vllm.base_urls=[$list]'"
fi
[[ $DRY_RUN == 1 ]] && exit 0
status=0
wait -n || status=$?  # one server gone (crashed or stopped): stop the others too
echo "serve: a server exited (status $status); stopping the rest" >&2
stop_all 1
