#!/bin/bash
# Issue 15, item 9: qlm live on one GPU against what a vLLM operator already has, on prefill-bound traffic
# (scenarios/prefill_bound.yaml: 30 % interactive with a 2 s TTFT SLO, 70 % batch with 30 s; code-completion
# lengths). Two real vLLM 0.24 servers (Llama-3.1-8B shape, dummy weights, vLLM's defaults but the profile's
# context length) share the GPU, each with 0.42 of its memory: one in fcfs mode, one with
# --scheduling-policy priority. bench/bench_live_qlm.py replays the same requests four times:
#   fcfs-alone, priority-alone (client straight to the engine, priority sent), qlm (through `qlmctl serve`, engine
#   in fcfs), qlm+priority (engine in priority mode, qlm sets each request's priority from its plan).
# Two calls on a warm machine (each well under 10 minutes; the servers stay up between them):
#   run(command="STAGE=1 bash bench/device/qlm_live_h200.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#   run(command="STAGE=2 bash bench/device/qlm_live_h200.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
# Stage 1 starts both servers and runs the two engine-alone replays; stage 2 the two through the gateway.
# Each writes $OUT/live_qlm_stage<N>/summaries.json and the table bench_live_qlm.py prints.
set -u
STAGE=${STAGE:-1}
RATE=${RATE:-26}
N=${N:-900}
source bench/device/vllm_env.sh
VLLM_FLAGS="--load-format dummy --dtype bfloat16 --max-model-len 8192 --enable-sleep-mode --gpu-memory-utilization 0.42"
make_models
log "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
# Started one after the other (two compiles at once on one GPU would race for its memory); a warm machine's
# servers are reused.
TAG=fcfs ensure_vllm "$K/m8b" llama-3.1-8b 8000 || exit 4
TAG=priority ensure_vllm "$K/m8b" llama-3.1-8b 8001 --scheduling-policy priority || exit 4
case $STAGE in
1) RUNS=fcfs-alone,priority-alone ;;
2) RUNS=qlm,qlm+priority ;;
*) RUNS=$STAGE ;;
esac
log "bench_live_qlm: $RUNS at $RATE req/s, $N requests"
timeout 540 python3 bench/bench_live_qlm.py --vllm-fcfs http://127.0.0.1:8000 --vllm-priority http://127.0.0.1:8001 \
  --rate "$RATE" -n "$N" --runs "$RUNS" --out "$OUT/live_qlm_stage$STAGE" 2>&1 \
  | grep -vE "━|^\s*$" | tail -12
log "stage $STAGE done"
