#!/bin/bash
# Device call B: live replays of scenarios/fidelity_h200.yaml at three loads under fcfs and qlm, through
# `qlmctl serve`, in front of a real vLLM 8B server started here without prefix caching.
# run(command="bash bench/device/fidelity_h200.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
head -12 scenarios/profiles/h200-llama-3.1-8b.yaml
make_models; start_vllm "$K/m8b" llama-3.1-8b 8000 || exit 4
mkdir -p "$OUT/fid"
for spec in "light 8 240" "near 20 600" "over 32 960"; do
  set -- $spec
  log "live replay $1: $2 req/s, $3 requests"
  qlm serve -s scenarios/fidelity_h200.yaml --replay --rate "$2" -n "$3" -p fcfs,qlm -o "$OUT/fid/$1" 2>&1 \
    | grep -vE "━|^\s*$" | tail -32
done
tar czf "$OUT/fidelity_live.tgz" -C "$OUT/fid" . && rm -rf "$OUT/fid"
log "done"
