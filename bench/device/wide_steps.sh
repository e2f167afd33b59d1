#!/bin/bash
# One device call (issue 18, the conversation at 8x: TTFT p10-p55 20-40 % low): steps that carry a large prefill
# beside many decodes (up to ~7.6k prompt tokens beside 224 decoders: what an engine ramping up under overload
# runs), against the step model; the profile's mixed points stop at 2,048 prompt tokens beside 160 decoders.
# bench/device/multi_prefill.py with 32 and with 224 decoders, the same injections; vLLM's defaults as the unseen
# replays ran them (--max-num-seqs 1024) but prefix caching off: its cost is nil (bench/device/caching_cost.sh), and
# runs that repeated a token stream hit it.
# (BATCHES="32 96 160 224" for more decode counts)
# run(command="bash bench/device/wide_steps.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"], timeout_s=600)
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
VLLM_FLAGS=${VLLM_FLAGS/--max-num-seqs 256/--max-num-seqs 1024}
make_models
gpu_tag
log "gpu: $GPU; flags: $VLLM_FLAGS"
ensure_vllm "$K/m8b" llama-3.1-8b 8000 || exit 1
POINTS=${POINTS:-1x2048,2x2048,4x1900,1x7600,8x950}
for b in ${BATCHES:-32 224}; do
  dt=3000; [ $b -gt 64 ] && dt=1600
  log "decoders $b"
  timeout 200 python3 bench/device/multi_prefill.py --url http://127.0.0.1:8000 --batch $b --ctx 128 \
    --decode-tokens $dt --reps ${REPS:-2} --points "$POINTS" \
    --profile scenarios/profiles/$TAGG-llama-3.1-8b.yaml --out "$OUT/wide_steps_${TAGG}_b$b.json" 2>&1 | tail -8
done
python3 - <<'PY'
import json, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=5).read().decode()
print([l for l in text.splitlines() if l.startswith("vllm:num_preemptions_total")])
PY
log done
