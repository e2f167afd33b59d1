#!/bin/bash
# One device call (issue 18): step times under sustained prefill load against the step model, with the GPU's clock
# and power logged (bench/device/power_steps.py; bench/device/sustained.sh found the H100 at its power cap under
# overload, SM clock ~1,500 MHz against ~1,930 in profile-model's bursts). Phases at 1, 0.8, 0.5 and 0.25 of the
# engine's prefill capacity, 32 decoders throughout, prompts of 2,048 tokens; vLLM's defaults as the unseen replays
# ran them, prefix caching off (fresh random prompts anyway).
# run(command="bash bench/device/power.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"], timeout_s=600)
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
VLLM_FLAGS=$DEFAULT_FLAGS
PORT=8010
make_models
gpu_tag
log "gpu: $GPU; flags: $VLLM_FLAGS"
ensure_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4
watch_gpu "$OUT/smi_power.csv"
timeout 400 python3 bench/device/power_steps.py --url http://127.0.0.1:$PORT --duties ${DUTIES:-1,0.8,0.5,0.25} \
  --seconds ${SECONDS_EACH:-25} --decode-tokens 4000 --profile scenarios/profiles/$TAGG-llama-3.1-8b.yaml \
  --out "$OUT/power_steps_$TAGG.json" --phases "$OUT/phases_power.txt" 2>&1 | tail -8
kill $SMI 2>/dev/null
python3 bench/device/smi_phases.py "$OUT/smi_power.csv" "$OUT/phases_power.txt"
log done
