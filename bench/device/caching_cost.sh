#!/bin/bash
# One device call (issue 18): what vLLM's prefix caching costs per step when nothing hits. The profiles are
# measured with --no-enable-prefix-caching (and --max-num-seqs 256); the unseen replays ran vLLM's defaults
# (caching on, 1,024 sequences) and ran 1-3 % slower under load than the simulation of them. This starts the
# same engine twice, caching off then on (--max-num-seqs 1024 both), and runs bench/device/multi_prefill.py
# against each: decode-only steps of 32 sequences, and the extra a step pays for k prompts of L tokens (random
# tokens: no prefix hits), beside the step model's figure from the GPU's own profile.
# run(command="bash bench/device/caching_cost.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"], timeout_s=600)
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
BASE_FLAGS=${VLLM_FLAGS/--max-num-seqs 256/--max-num-seqs 1024}
make_models
gpu_tag
for mode in off on; do
  VLLM_FLAGS=$BASE_FLAGS
  [ $mode = on ] && VLLM_FLAGS=${BASE_FLAGS/ --no-enable-prefix-caching/}
  log "gpu: $GPU; caching $mode; flags: $VLLM_FLAGS"
  TAG=llama-caching-$mode start_vllm "$K/m8b" llama-3.1-8b 8000 || exit 1
  timeout 200 python3 bench/device/multi_prefill.py --url http://127.0.0.1:8000 --reps ${REPS:-3} \
    --profile scenarios/profiles/$TAGG-llama-3.1-8b.yaml --out "$OUT/multi_prefill_${TAGG}_caching_$mode.json" 2>&1 | tail -12
  python3 - "$mode" <<'PY'
import json, sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=5).read().decode()
print("caching", sys.argv[1], [l for l in text.splitlines() if l.startswith("vllm:prefix_cache_")])
PY
  stop_vllm
done
log "done"
