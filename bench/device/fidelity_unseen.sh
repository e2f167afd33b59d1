#!/bin/bash
# Device calls for issue 18: fidelity on replays the profile never saw, and the prefix-caching check, against
# real vLLM 0.24 on one H200 (Llama-3.1-8B shape, dummy weights) with vLLM's defaults (--max-num-seqs 1024 and
# 8,192-token steps on an H200, prefix caching on, asynchronous scheduling on; --max-model-len 8192 as the
# profile). The client talks to vLLM directly (bench/device/replay_direct.py), except one run through the
# gateway. Three calls, each well under the 10-minute limit; the server of stage 1 serves stage 2 on the warm
# machine (stage 3 restarts it with --scheduling-policy priority):
#   run(command="STAGE=1 bash bench/device/fidelity_unseen.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       ~5 min: start vLLM (~100 s), Mooncake slice with its prefix sharing, code completion light/near/over
#   run(command="STAGE=2 bash bench/device/fidelity_unseen.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       ~2.5 min: conversation 2x/4x/8x straight to vLLM (fcfs), 4x through `qlmctl serve` (fcfs)
#   run(command="STAGE=3 bash bench/device/fidelity_unseen.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       ~3.5 min: restart with --scheduling-policy priority; conversation 4x/8x and code near, priority sent
#   STAGE=3b: stage 3's conversation at 8x alone (~2.5 min)
# Each stage writes $OUT/unseen_stage<N>.tgz (<set>/<load>/<label>/summary.json, requests.parquet: what
# bench/fidelity_compare.py reads; summary.engine_metrics holds vLLM's own histogram and counter deltas, the
# prefix-cache counters included) and $OUT/server_llama-3.1-8b.log. Compare on this side (see docs/fidelity.md):
#   mkdir -p /tmp/unseen && for f in unseen_stage*.tgz; do tar xzf $f -C /tmp/unseen; done
#   python bench/fidelity_compare.py /tmp/unseen/conv --scenario scenarios/fidelity_unseen.yaml \
#       --loads light:10.8:216,near:21.5:540,over:43:1075 --policies direct,direct@priority,fcfs
#   python bench/fidelity_compare.py /tmp/unseen/code --scenario scenarios/fidelity_code.yaml \
#       --loads light:8:160,near:16:320,over:22:440 --policies direct,direct@priority
#   python bench/fidelity_compare.py /tmp/unseen/mooncake --scenario scenarios/fidelity_mooncake.yaml \
#       --loads paced:5:400 --policies direct
# Against a profile measured on the live runs' GPU (e.g. an H100's, by profile_h200.sh): add
#   --profile scenarios/profiles/h100-llama-3.1-8b.yaml
set -u
STAGE=${STAGE:-1}
source bench/device/vllm_env.sh
PORT=8010
URL=http://127.0.0.1:$PORT
# vLLM's defaults but the context length the profile was measured at (and sleep mode, as every script here).
VLLM_FLAGS="--load-format dummy --dtype bfloat16 --max-model-len 8192 --enable-sleep-mode"
free_gpu() {  # stop the servers the other device scripts left up (one H200 holds one server at 0.9 memory)
  for f in "$K"/server_*.pgid; do
    [ -f "$f" ] || continue
    pg=$(cat "$f"); kill -- -"$pg" 2>/dev/null && log "stopped server group $pg ($f)"; rm -f "$f"
  done
  sleep 5
}
mkdir -p "$OUT/unseen"
R="$OUT/unseen"
direct() {  # set load rate n [extra]: one replay straight to vLLM
  local set=$1 load=$2 rate=$3 n=$4; shift 4
  log "direct $set/$load: $rate req/s, $n requests $*"
  timeout 300 python3 bench/device/replay_direct.py -s "scenarios/fidelity_$set.yaml" --url $URL --rate "$rate" -n "$n" \
    -o "$R/$set/$load" "$@" 2>&1 | grep -vE "━|^\s*$" | tail -2
}
make_models
case $STAGE in
1)
  free_gpu
  start_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4
  log "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
  # The slice's 400 requests at 5 req/s, with their prefix sharing (a replay without it would need a restart:
  # the comparison holds the simulation with and without caching against this run instead).
  direct mooncake paced 5 400
  direct code light 8 160
  direct code near 16 320
  direct code over 22 440
  ;;
2)
  # Stage 1's server only (ensure_vllm): one that stage 3 left in priority mode would order these runs its way.
  ensure_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4
  direct unseen light 10.8 216
  direct unseen near 21.5 540
  direct unseen over 43 1075
  log "through the gateway: near, fcfs"
  timeout 300 python3 -c "from qlmctl.cli import main; main()" serve -s scenarios/fidelity_unseen.yaml --replay \
    --client-procs 4 --rate 21.5 -n 540 -p fcfs -o "$R/unseen/near" 2>&1 | grep -vE "━|^\s*$" | tail -6
  ;;
3)
  free_gpu
  start_vllm "$K/m8b" llama-3.1-8b $PORT --scheduling-policy priority || exit 4
  direct unseen near 21.5 540 --priority
  direct unseen over 43 1075 --priority
  direct code near 16 320 --priority
  ;;
3b)  # stage 3's overloaded conversation alone (the run the H100 session of 2026-12-06 had no time left for)
  free_gpu
  start_vllm "$K/m8b" llama-3.1-8b $PORT --scheduling-policy priority || exit 4
  direct unseen over 43 1075 --priority
  ;;
esac
# Folder names as bench/fidelity_compare.py expects them: <set>/<load>/<label>.
mv "$R/unseen" "$R/conv" 2>/dev/null
tar czf "$OUT/unseen_stage$STAGE.tgz" -C "$R" . && rm -rf "$R"
log "stage $STAGE done"
