#!/bin/bash
# Where a request's TTFT goes inside vLLM, request by request (issue 18: the conversation's TTFT near saturation is
# 14-25 % short in simulation on every host, ~20 ms of it inside vLLM's own TTFT, which its histograms cannot place).
# One device call: vLLM with the unseen replays' flags (defaults, prefix caching off) and bench/device/reqtrace on its
# PYTHONPATH, which logs each finished request's API-server arrival, engine-core QUEUED / SCHEDULED / first-token
# times and the API server's first-token latency; then the unseen replays, fcfs straight to vLLM, one trace file each.
#   run(command="bash bench/device/req_trace.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#   (SPECS="unseen near 21.5 540" bash ...: only those replays, comma-separated "set load rate requests";
#    WINDOWS=9,10: then bench/device/probe_cost.py's windows of those PLAN indices on the same server, traced too)
# Read here: python bench/req_trace_split.py DIR (DIR: the unpacked req_trace.tgz)
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
default_server
export QLM_REQ_TRACE=$OUT/reqtrace.jsonl
SAVED_PYTHONPATH=$PYTHONPATH
export PYTHONPATH=$PWD/bench/device/reqtrace:$PYTHONPATH
ensure_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4
export PYTHONPATH=$SAVED_PYTHONPATH
unset QLM_REQ_TRACE
grep -m1 "reqtrace" "$OUT/server_llama-3.1-8b.log"
R="$OUT/trace"
watch_cpu; WPID=$!  # the API server's, the engine core's and the client's CPU every 2 s ($OUT/top.log)
IFS=, read -ra SPECS <<< "${SPECS:-unseen light 10.8 216,unseen near 21.5 540,unseen over 43 1075,code near 16 320,code over 22 440}"
for spec in "${SPECS[@]}"; do
  set -- $spec
  log "direct $1/$2: $3 req/s, $4 requests"
  timeout 200 python3 bench/device/replay_direct.py -s "scenarios/fidelity_$1.yaml" --url $URL --rate "$3" -n "$4" \
    -o "$R/$1/$2" 2>&1 | grep -vE "━|^\s*$" | tail -1
  sleep 2  # the last finishes logged
  mv "$OUT/reqtrace.jsonl" "$R/$1/$2/reqtrace.jsonl" 2>/dev/null || log "no trace for $1/$2"
  mv "$OUT/reqtrace.jsonl.events" "$R/$1/$2/reqtrace.jsonl.events" 2>/dev/null
  wc -l < "$R/$1/$2/reqtrace.jsonl" 2>/dev/null
done
if [ -n "${WINDOWS:-}" ]; then  # probe_cost.py's windows (--plan $WINDOWS) on the same traced server
  log "windows $WINDOWS"
  mkdir -p "$R/windows"
  timeout 150 python3 bench/device/probe_cost.py --url $URL --label traced --plan "$WINDOWS" \
    -o "$R/windows/probe.json" 2>&1 | tail -6
  sleep 2
  mv "$OUT/reqtrace.jsonl" "$R/windows/reqtrace.jsonl" 2>/dev/null || log "no trace for the windows"
  mv "$OUT/reqtrace.jsonl.events" "$R/windows/reqtrace.jsonl.events" 2>/dev/null
fi
mv "$R/unseen" "$R/conv" 2>/dev/null
kill $WPID 2>/dev/null; gzip -c "$OUT/top.log" > "$R/top.log.gz" && rm -f "$OUT/top.log"
tar czf "$OUT/req_trace.tgz" -C "$R" . && rm -rf "$R"
log done
