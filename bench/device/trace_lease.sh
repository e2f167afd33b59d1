#!/bin/bash
# Two device calls on one warm machine (issue 18, the conversation's TTFT near saturation): a profile whose API-server
# windows send probes as a trace's requests are (words to tokenize, a streamed answer) and, in the same windows'
# settings, prefill-only probes of token ids, then the unseen replays on the same server, every request traced
# (bench/device/reqtrace: the way in hop by hop, the API server's loop lag, garbage collections) and the API server's
# CPU counted over each replay (`process_cpu_seconds` in engine_metrics). The same vLLM flags as lease_check.sh.
#   run(command="STAGE=1 bash bench/device/trace_lease.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       start vLLM traced, profile-model (its prefill points, then its load windows, words:32 then ids:1 at 0/128/256
#       streams, each count followed by one window of streams asking for usage in every chunk (--usage-cost, ~10 s
#       a count: the profile's frontend_usage_cpu_per_token_s; off on an H200 unless USAGE_COST=1), then the rest once
#       a prefill runs at its speed before the windows again)
#   run(command="STAGE=2 bash bench/device/trace_lease.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       the same server (warm: call within its 30 s): conversation light / near / over, code near / over, fcfs,
#       straight to vLLM, one trace file each
#   run(command="STAGE=3 bash bench/device/trace_lease.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       a fresh server with --no-async-scheduling, the conversation near twice, light and code near once; then vLLM's
#       default (asynchronous scheduling) and the conversation near twice: trace_sync.tgz (sync/, async/)
#   run(command="CALL_LIMIT_S=270 STAGE=4 bash bench/device/trace_lease.sh", carry=[...], kind="nvidia-h200")
#       the conversation near twice with the engine core's step log; on an H200, then its sustained-load run
#   run(command="STAGE=6 bash bench/device/trace_lease.sh", carry=[...])  (after stage 1, on its warm machine)
#       the conversation near through `qlmctl serve` (fcfs), then a restart with --scheduling-policy priority and the
#       replays with priority sent (conversation near twice and over, code near and over): trace_priority.tgz
#   run(command="STAGE=7 bash bench/device/trace_lease.sh", carry=[...])  (one call, no restart)
#       stage 1 against a server started with --scheduling-policy priority, then the replays with priority sent
#       (conversation near and over, code near) and the conversation near through the gateway. On a fresh H200 (vLLM
#       serving after ~226 s; the profile's decode points at 512 and 1,024 sequences and its wait for the server to
#       settle after the load windows, up to a minute): PROFILE_END_S=560 gives the profile the call, STAGE 9 follows
#       (when either kind may come: `if nvidia-smi -L | grep -q H200; then export PROFILE_END_S=560; fi; STAGE=7 ...`;
#       on an H100 the profile ended at ~380 s and the priority replays ran, the gateway went to STAGE 9)
#   run(command="STAGE=8 bash bench/device/trace_lease.sh", carry=[...])  (~5 min, no profile)
#       a server with --scheduling-policy priority, the conversation near and code near each sent without and with
#       priorities: trace_prio_pairs.tgz
#   run(command="STAGE=9 bash bench/device/trace_lease.sh", carry=[...])  (stage 7's warm server, when its profile
#       took the call: a fresh H200 took 226 s to serve, and stage 7's replays found no time)
#       the replays with priority sent, the conversation near through the gateway, then fcfs replays as time allows
#   run(command="STAGE=10 bash bench/device/trace_lease.sh", carry=[...])  (stage 7's warm server)
#       the spread between server processes: the conversation near twice on stage 7's server and through the gateway,
#       then on two fresh traced fcfs servers (near twice each, light and over on the first): trace_spread.tgz
#   run(command="STAGE=5 bash bench/device/trace_lease.sh", carry=[...])  (a traced server, stage 1's when warm)
#       the same server: the conversation near from one client process and from four, twice each, then the other
#       loads from four (is the way in's stall the client's? `client_sent.json` has each request's bytes-out time)
# Here: the profile fitted on either kind of window (`qlmctl profile-model m --from-raw raw-lease.json
# --load-probes ids:1`), `bench/fidelity_compare.py DIR/conv --scenario scenarios/fidelity_unseen.yaml --loads
# light:10.8:216,near:21.5:540,over:43:1075 --policies direct --profile PROFILE --set enable_prefix_caching=false`,
# `bench/req_trace_split.py DIR --in-out --lag --api`.
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
default_server
VER=$(python3 -c "import vllm; print(vllm.__version__)")
TRACE=$K/reqtrace.jsonl  # on the machine's own disk: the server outlives the call that started it
LOG=server_llama-3.1-8b.log  # the server's log, in $K for the same reason
take_trace() {  # $1: where the trace so far goes
  sleep 2  # the last finishes logged
  mv "$TRACE" "$1" 2>/dev/null || log "no trace for $1"
  mv "$TRACE.events" "$1.events" 2>/dev/null
  mv "$TRACE.steps" "$1.steps" 2>/dev/null
}
replays() {  # $1: folder; the rest: "set load rate requests [client processes [replay_direct.py flags]]" specs (0
  # processes: replay_direct.py's default, one per 4 CPUs); a repeated load gets near_b, ...
  local R=$1; shift
  for spec in "$@"; do
    set -- $spec
    if [ $(( $(date +%s) - T0 )) -gt $(( ${CALL_LIMIT_S:-585} - 75 )) ]; then log "no time left for $spec"; continue; fi
    local procs=${5:-0} name=$2 flags="${*:6}"
    [ "$procs" -gt 1 ] && name=${2}_p$procs
    dest=$R/$1/$name
    for rep in b c d e; do [ -e "$dest" ] || break; dest=$R/$1/${name}_$rep; done
    log "direct $1/$2: $3 req/s, $4 requests, client processes: $procs (0: by CPUs) $flags -> $dest"
    timeout 200 python3 bench/device/replay_direct.py -s "scenarios/fidelity_$1.yaml" --url $URL --rate "$3" -n "$4" \
      --client-procs "$procs" -o "$dest" $flags 2>&1 | grep -vE "━|^\s*$" | tail -1
    take_trace "$dest/reqtrace.jsonl"
    wc -l < "$dest/reqtrace.jsonl" 2>/dev/null
  done
}
replay_set() {  # $1: the tarball; $2: the default specs (SPECS overrides): replays, the CPU watched, packed
  local R="$OUT/trace" specs
  watch_cpu; local WPID=$!
  # Local: read into the global SPECS, a stage's second set replayed the first set's first spec again (STAGE 9's
  # fcfs set of the twenty-second session ran the conversation near with priorities a third time)
  IFS=, read -ra specs <<< "${SPECS:-$2}"
  replays "$R" "${specs[@]}"
  mv "$R/unseen" "$R/conv" 2>/dev/null
  kill $WPID 2>/dev/null; gzip -c "$OUT/top.log" > "$R/top.log.gz" && rm -f "$OUT/top.log"
  tar czf "$OUT/$1" -C "$R" . && rm -rf "$R"
}
traced_server() {  # vLLM with the trace hook, its log in $K; extra flags as arguments; if it fails to start, exit 4
  # with its log in $OUT/${FAIL_LOG:-server_fail.log.gz}
  export QLM_REQ_TRACE=$TRACE
  local saved=$PYTHONPATH
  export PYTHONPATH=$PWD/bench/device/reqtrace:$PYTHONPATH
  OUT=$K ensure_vllm "$K/m8b" llama-3.1-8b $PORT "$@" \
    || { gzip -c "$K/$LOG" > "$OUT/${FAIL_LOG:-server_fail.log.gz}"; exit 4; }
  export PYTHONPATH=$saved
  unset QLM_REQ_TRACE
  grep -m1 "reqtrace" "$K/$LOG"
  rm -f "$TRACE" "$TRACE.events" "$TRACE.steps"  # the start's own requests
}
load_streams() {  # LOAD_STREAMS, else 0,128,256; on an H200 0,128,192: at 256 streams its API server sat at one core
  # and the probes' queue ran away (4-10 s in 4-s windows, the twentieth session), windows the fit leaves out
  if [ -n "${LOAD_STREAMS:-}" ]; then echo "$LOAD_STREAMS"; elif [ "$TAGG" = h200 ]; then echo 0,128,192
  else echo 0,128,256; fi
}
usage_cost() {  # USAGE_COST=1|0, else on but on an H200, whose call needs its ~20 s for the decode points at 512 and
  # 1,024 sequences (its usage cost was read off replays: +6.6 us a token, bench/usage_cost.py)
  if [ "${USAGE_COST:-$([ "$TAGG" = h200 ] && echo 0 || echo 1)}" = 1 ]; then echo --usage-cost; else echo --no-usage-cost; fi
}
profile_run() {  # profile-model against the server up, its trace and the server's log kept (stage 1's)
  watch_cpu; WPID=$!
  timeout -s INT $(( ${CALL_LIMIT_S:-585} - $(date +%s) + T0 )) python3 -c "$PROFILE_PY" llama-3.1-8b --url $URL \
    --out "$OUT/$TAGG-lease.yaml" --raw "$OUT/raw-lease.json" --gpu "$GPU" \
    --flags "vllm $VER: $VLLM_FLAGS (torch.compile + CUDA graphs)" --max-num-seqs 1024 --max-num-batched-tokens 8192 \
    --prompt-lengths 256,512,1024,2048,4096,8000 --reps 2 --batches 1,32,128,256,512,1024 --contexts 128,1024 \
    --mixed-batches 32,160 --mixed-contexts 512 --mixed-lengths 256,2048 --no-frontend \
    --load-streams "$(load_streams)" --load-rates 4,20 --load-window-s 4 --load-probes words:32,ids:1 \
    "$(usage_cost)" --sustained-s 20 2>&1 | grep -vE "━" | tail -60
  kill $WPID 2>/dev/null
  take_trace "$OUT/profile_trace.jsonl"
  gzip -f "$OUT/profile_trace.jsonl" "$OUT/profile_trace.jsonl.events" "$OUT/top.log" 2>/dev/null
  gzip -c "$K/$LOG" > "$OUT/server_1.log.gz"
}
gateway_near() {  # the conversation near through `qlmctl serve` (fcfs), from four client processes, into $1
  mkdir -p "$1/gateway/near"
  log "through the gateway: conversation near, fcfs, four client processes"
  timeout 150 python3 -c "from qlmctl.cli import main; main()" serve -s scenarios/fidelity_unseen.yaml --replay \
    --client-procs 4 --rate 21.5 -n 540 -p fcfs -o "$1/gateway/near" 2>&1 | grep -vE "━|^\s*$" | tail -4
  take_trace "$1/gateway/near/reqtrace.jsonl"
}
priority_and_gateway() {  # stage 7's and 9's replays with priority sent, then (time left) the conversation near
  # through the gateway: trace_priority.tgz, trace_gateway.tgz
  local R="$OUT/trace"
  replay_set trace_priority.tgz "unseen near 21.5 540 0 --priority,unseen over 43 1075 0 --priority,code near 16 320 0 \
--priority"
  if [ $(( $(date +%s) - T0 )) -lt $(( ${CALL_LIMIT_S:-585} - 160 )) ]; then
    mkdir -p "$R" && gateway_near "$R" && tar czf "$OUT/trace_gateway.tgz" -C "$R" . && rm -rf "$R"
  else log "no time left for the gateway: STAGE 9 on the warm server"; fi
}
case ${STAGE:-1} in
1)
  FAIL_LOG=server_1.log.gz traced_server
  profile_run
  ;;
2)
  OUT=$K ensure_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4  # stage 1's (a fresh one here would be untraced)
  rm -f "$TRACE" "$TRACE.events"
  replay_set trace_lease.tgz "unseen light 10.8 216,unseen near 21.5 540,unseen over 43 1075,code near 16 320,code over 22 440"
  gzip -c "$K/$LOG" > "$OUT/server_2.log.gz"
  ;;
3)  # asynchronous scheduling off, then on (vLLM's default): the conversation near saturation twice each, traced
  # (is the engine's part the simulator misses in vLLM's one-step-ahead pipeline?)
  R="$OUT/trace"
  watch_cpu; WPID=$!
  traced_server --no-async-scheduling
  replays "$R/sync" "unseen near 21.5 540" "unseen near 21.5 540" "unseen light 10.8 216" "code near 16 320"
  gzip -c "$K/$LOG" > "$OUT/server_sync.log.gz"
  traced_server
  replays "$R/async" "unseen near 21.5 540" "unseen near 21.5 540"
  gzip -c "$K/$LOG" > "$OUT/server_async.log.gz"
  for d in "$R"/*/unseen; do mv "$d" "${d%/unseen}/conv"; done
  kill $WPID 2>/dev/null; gzip -c "$OUT/top.log" > "$R/top.log.gz" && rm -f "$OUT/top.log"
  tar czf "$OUT/trace_sync.tgz" -C "$R" . && rm -rf "$R"
  ;;
4)  # one short call: a traced server (vLLM's defaults), the conversation near twice with the engine core's step log
  # (`<trace>.steps`); on an H200, then the sustained-load run alone for the H200 profile (bench/device/sustained_fit.py)
  R="$OUT/trace"
  traced_server
  replays "$R/steps" "unseen near 21.5 540" "unseen near 21.5 540"
  for d in "$R"/*/unseen; do mv "$d" "${d%/unseen}/conv"; done
  tar czf "$OUT/trace_steps.tgz" -C "$R" . && rm -rf "$R"
  gzip -c "$K/$LOG" > "$OUT/server_steps.log.gz"
  if [ "$TAGG" = h200 ] && [ $(( $(date +%s) - T0 )) -lt $(( ${CALL_LIMIT_S:-270} - 60 )) ]; then
    timeout -s INT $(( ${CALL_LIMIT_S:-270} - $(date +%s) + T0 )) python3 -c "$PROFILE_PY" llama-3.1-8b --url $URL \
      --out "$OUT/h200-sustained.yaml" --raw "$OUT/raw-sustained.json" --gpu "$GPU" --prompt-lengths 512,2048,4096 \
      --reps 1 --batches 1,32,128 --contexts 128 --no-mixed --no-frontend --no-frontend-load --sustained-s 20 2>&1 \
      | grep -vE "━" | grep -E "sustained" | tail -4
  fi
  ;;
5)
  traced_server  # stage 1's, when warm
  replay_set trace_procs.tgz "unseen near 21.5 540 1,unseen near 21.5 540 4,unseen near 21.5 540 1,unseen near 21.5 540 4,unseen light 10.8 216 4,code near 16 320 4,unseen near 21.5 540 4,code over 22 440 4,unseen over 43 1075 4"
  gzip -c "$K/$LOG" > "$OUT/server_5.log.gz"
  ;;
6)  # the rest of the issue's grid on stage 1's host: the conversation near through the gateway (fcfs, on stage 1's
  # server), then a traced server with --scheduling-policy priority and the replays with each request's priority sent
  R="$OUT/trace"
  traced_server  # stage 1's, when warm
  gateway_near "$R"
  gzip -c "$K/$LOG" > "$OUT/server_6a.log.gz"
  traced_server --scheduling-policy priority
  replay_set trace_priority.tgz "unseen near 21.5 540 0 --priority,code near 16 320 0 --priority,unseen over 43 1075 0 \
--priority,code over 22 440 0 --priority,unseen near 21.5 540 0 --priority"
  gzip -c "$K/$LOG" > "$OUT/server_6.log.gz"
  ;;
7)  # stages 1 and 6 in one call, with no restart: one traced server with --scheduling-policy priority (a request
  # sent without a priority has the default one, and vLLM serves equal priorities first come, first served), its
  # profile, the replays with priority sent, then the conversation near through the gateway (no priority sent)
  FAIL_LOG=server_1.log.gz traced_server --scheduling-policy priority
  # PROFILE_END_S: when the profile must end, s into the call (default: leaves the replays and the gateway ~4 min,
  # but the profile at least 230 s: a fresh H200's vLLM took 226 s to serve, and a profile cut at 110 s had too few
  # points to fit; the replays then find no time and STAGE 9 runs them on the warm server)
  up=$(( $(date +%s) - T0 ))
  CALL_LIMIT_S=${PROFILE_END_S:-$(( ${CALL_LIMIT_S:-585} - 250 > up + 230 ? ${CALL_LIMIT_S:-585} - 250 : up + 230 ))} \
    profile_run
  priority_and_gateway
  gzip -c "$K/$LOG" > "$OUT/server_7.log.gz"
  ;;
8)  # a short call (no profile): one traced server with --scheduling-policy priority, each replay sent without and
  # with priorities in turn (equal priorities are served first come, first served): is priority modelled as closely
  # as fcfs on one host? Compared against a profile of another host, the two rows share that host's error
  traced_server --scheduling-policy priority
  replay_set trace_prio_pairs.tgz \
    "unseen near 21.5 540,unseen near 21.5 540 0 --priority,code near 16 320,code near 16 320 0 --priority"
  gzip -c "$K/$LOG" > "$OUT/server_8.log.gz"
  ;;
9)  # stage 7's replays on its warm server (--scheduling-policy priority), then the same sent without priorities
  # (equal priorities are served first come, first served): trace_priority.tgz, trace_gateway.tgz, trace_fcfs.tgz
  traced_server --scheduling-policy priority  # stage 7's, when warm
  priority_and_gateway
  # The conversation near twice: the twentieth session's one fcfs run there had an API-server part of 84 ms against
  # 117-120 in four priority and gateway runs on the same server; is it the outlier?
  replay_set trace_fcfs.tgz "unseen near 21.5 540,code near 16 320,unseen near 21.5 540,unseen over 43 1075,\
unseen light 10.8 216"
  gzip -c "$K/$LOG" > "$OUT/server_9.log.gz"
  ;;
10)  # the spread between vLLM server processes (issue 18: on the fifteenth H100 the conversation near ran at TTFT p50
  # 140-157 ms on one process and 169-170 on the next): stage 7's warm server (equal priorities: first come, first
  # served) twice and through the gateway, then two fresh traced servers (fcfs; the flags alternate so that each
  # starts anew), the conversation near twice on each, light and over on the first: trace_spread.tgz
  R="$OUT/trace"
  watch_cpu; WPID=$!
  traced_server --scheduling-policy priority  # stage 7's, when warm
  replays "$R/p1" "unseen near 21.5 540" "unseen near 21.5 540"
  if [ $(( $(date +%s) - T0 )) -lt $(( ${CALL_LIMIT_S:-585} - 300 )) ]; then gateway_near "$R/p1"; fi
  gzip -c "$K/$LOG" > "$OUT/server_10a.log.gz"
  n=2
  for flags in "--scheduling-policy fcfs" ""; do
    if [ $(( $(date +%s) - T0 )) -gt $(( ${CALL_LIMIT_S:-585} - 180 )) ]; then log "no time left for process $n"; break; fi
    FAIL_LOG=server_10_$n.log.gz traced_server $flags
    if [ $n = 2 ]; then replays "$R/p$n" "unseen near 21.5 540" "unseen near 21.5 540" "unseen light 10.8 216" \
      "unseen over 43 1075"
    else replays "$R/p$n" "unseen near 21.5 540" "unseen near 21.5 540"; fi
    gzip -c "$K/$LOG" > "$OUT/server_10_$n.log.gz"
    n=$((n + 1))
  done
  for d in "$R"/*/unseen; do mv "$d" "${d%/unseen}/conv"; done
  kill $WPID 2>/dev/null; gzip -c "$OUT/top.log" > "$R/top.log.gz" && rm -f "$OUT/top.log"
  tar czf "$OUT/trace_spread.tgz" -C "$R" . && rm -rf "$R"
  ;;
esac
# One file back: a call's results of more than a few files came back without some ("count", an H200 call of
# the twentieth session lost its trace_priority.tgz so).
( cd "$OUT" && tar cf /tmp/results.tar . && rm -rf ./* && mv /tmp/results.tar . )
log done
