#!/bin/bash
# Where the rate effect on a probe's TTFT under streaming load sits (docs/fidelity.md, "A sixth host"): profile-model's
# load windows at five arrival rates, first with one API server, then with two (`--api-server-count 2` halves each
# process's load; a part that does not shrink is the engine's). vLLM's defaults as the unseen replays, caching off.
#   run(command="bash bench/device/api_split.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])   ~6 min
# Writes $OUT/api1.json and $OUT/api2.json (bench/device/api_split.py's windows) and the two server logs.
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
default_server
for n in 1 2; do
  TAG=api$n start_vllm "$K/m8b" llama-3.1-8b $PORT --api-server-count $n || exit 4
  log "windows, $n API server(s)"
  timeout 240 python3 bench/device/api_split.py --url $URL -o "$OUT/api$n.json" 2>&1 | tail -16
  stop_vllm
  sleep 4
done
log done
