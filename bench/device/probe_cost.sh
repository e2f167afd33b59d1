#!/bin/bash
# What a one-token probe costs vLLM's engine under streaming load (docs/fidelity.md, "A sixth host": at 12-19 probes
# a second the steps ran 25-45 % longer than the step model says). bench/device/probe_cost.py's windows with the
# default server (asynchronous scheduling on), then two of them again with --no-async-scheduling; the GPU's clock,
# power and utilisation logged every 200 ms and the processes' CPU every 2 s. vLLM's defaults, caching off.
#   run(command="bash bench/device/probe_cost.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])   ~6 min
# PLAN=0,7,8 (probe_cost.py's --plan) and SYNC=0 (no second server) make a shorter call.
# Writes $OUT/probe_async.json, $OUT/probe_sync.json, $OUT/smi.csv, $OUT/top.log and the server logs.
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
default_server
watch_gpu "$OUT/smi.csv"
watch_cpu
trap 'kill $SMI 2>/dev/null; stop_vllm' EXIT
# A server these scripts left on the port (lease_check.sh's, on a warm machine) is stopped first.
pg=$(sed -n 1p "$K/port_$PORT" 2>/dev/null); [ -n "$pg" ] && { kill -- -"$pg" 2>/dev/null; sleep 6; }
TAG=async start_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4
log "windows, asynchronous scheduling (vLLM's default)"
timeout 240 python3 bench/device/probe_cost.py --url $URL --label async --plan "${PLAN:-all}" \
  -o "$OUT/probe_async.json" 2>&1 | tail -24
stop_vllm
[ "${SYNC:-1}" = 0 ] && { log done; exit 0; }
sleep 4
TAG=sync start_vllm "$K/m8b" llama-3.1-8b $PORT --no-async-scheduling || exit 4
log "windows, --no-async-scheduling"
timeout 120 python3 bench/device/probe_cost.py --url $URL --label sync --plan 0,3 -o "$OUT/probe_sync.json" 2>&1 | tail -8
log done
