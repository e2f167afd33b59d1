#!/bin/bash
# Device call: live replays of scenarios/fidelity_h200.yaml at three loads under fcfs and qlm, through
# `qlmctl serve`, in front of a real vLLM 8B server without prefix caching (started here unless
# profile_h200.sh left one up). Each run's summary holds the engine's own /metrics deltas (engine_metrics)
# and the gateway's event-loop lag; $OUT/top.log samples the processes' CPU use.
# run(command="bash bench/device/fidelity_h200.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
# Repetitions: LOADS="near 20 600;near_b 20 600" (bench/fidelity_compare.py pools near, near_b, ...);
# POLICIES="qlm,fcfs" reverses the order.
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
# A profile just measured on this warm machine (profile_h200.sh) replaces the committed one, so that the
# live policies estimate with it; PROFILE_FROM=none keeps the committed one.
P=${PROFILE_FROM:-$K/h200-llama-3.1-8b.yaml}
[ -f "$P" ] && cp "$P" scenarios/profiles/h200-llama-3.1-8b.yaml && log "profile from $P"
# VLLM_EXTRA adds server flags, e.g. "--api-server-count 4" to take the API server's CPU out of the path.
make_models; ensure_vllm "$K/m8b" llama-3.1-8b 8000 ${VLLM_EXTRA:-} || exit 4
watch_cpu
mkdir -p "$OUT/fid"
IFS=';' read -ra SPECS <<< "${LOADS:-light 8 240;near 20 600;over 32 960}"
for spec in "${SPECS[@]}"; do
  set -- $spec
  log "live replay $1: $2 req/s, $3 requests"
  qlm serve -s "${SCENARIO:-scenarios/fidelity_h200.yaml}" --replay --client-procs 4 --rate "$2" -n "$3" -p "${POLICIES:-fcfs,qlm}" \
    -o "$OUT/fid/$1" 2>&1 | grep -vE "━|^\s*$" | tail -32
done
if [ -n "${INPROC-1}" ]; then  # the same near-saturation fcfs run with the client inside the gateway's process (INPROC= skips it)
  log "live replay near, client in the gateway's process"
  qlm serve -s "${SCENARIO:-scenarios/fidelity_h200.yaml}" --replay --rate 20 -n 600 -p fcfs --in-process-client \
    -o "$OUT/fid/near_inproc" 2>&1 | grep -vE "━|^\s*$" | tail -12
fi
tar czf "$OUT/fidelity_live.tgz" -C "$OUT/fid" . && rm -rf "$OUT/fid"
log "done"
