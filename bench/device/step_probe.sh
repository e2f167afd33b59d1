#!/bin/bash
# One device call (issue 18, what the unseen replays left open): on the GPU lent, with vLLM's defaults as the
# unseen replays ran them (--max-num-seqs 1024, prefix caching off here):
#   1. steps that prefill several prompts at once against the step model (bench/device/multi_prefill.py; the
#      profile named after the GPU, e.g. scenarios/profiles/h100-llama-3.1-8b.yaml);
#   2. the API server as a queue with 0-384 streams (`qlmctl profile-model`'s load windows; its other points cut
#      to one each, so only raw-frontend.json's frontend_load is of use).
# run(command="bash bench/device/step_probe.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"], timeout_s=600)
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
VLLM_FLAGS=${VLLM_FLAGS/--max-num-seqs 256/--max-num-seqs 1024}
make_models
gpu_tag
log "gpu: $GPU; flags: $VLLM_FLAGS"
ensure_vllm "$K/m8b" llama-3.1-8b 8000 || exit 1
timeout 150 python3 bench/device/multi_prefill.py --url http://127.0.0.1:8000 \
  --profile scenarios/profiles/$TAGG-llama-3.1-8b.yaml --out "$OUT/multi_prefill_$TAGG.json" 2>&1 | tail -20
log "multi-prefill done"
timeout -s INT $(( ${CALL_LIMIT_S:-585} - $(date +%s) + T0 )) python3 -c "$PROFILE_PY" llama-3.1-8b \
  --url http://127.0.0.1:8000 --out "$OUT/frontend-$TAGG.yaml" --raw "$OUT/raw-frontend-$TAGG.json" --gpu "$GPU" \
  --flags "vllm: $VLLM_FLAGS" --max-num-seqs 1024 --prompt-lengths 1024 --reps 1 --batches 1 --contexts 128 \
  --no-mixed --no-frontend --load-streams ${LOAD_STREAMS:-0,128,192,256,320,384} --load-rates 4,12,20 \
  --load-window-s 4 2>&1 | grep -vE "━" | grep -E "probes|skip|not kept|Error|error" | tail -40
log "done"
