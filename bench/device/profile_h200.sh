#!/bin/bash
# One device call: profile a Llama-3.1-8B shape (dummy weights) on the GPU lent (an H200, or an H100: the
# profile is named after the GPU nvidia-smi reports, e.g. h100-llama-3.1-8b.yaml) with real vLLM: prefill, decode
# and mixed steps, and vLLM's API server as a queue (CPU per request and per streamed token, probe TTFTs
# under Poisson arrivals while it streams). Leaves the server up (prefix caching off) for fidelity_h200.sh on the warm machine.
# run(command="bash bench/device/profile_h200.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
# MODELS="m3b:llama-3.2-3b m8b:llama-3.1-8b" profiles both shapes (the last one stays up). The API-server windows
# go up to 320 streams: the unseen replays ran up to ~250 (near load) and ~490 (overload), where a fit up to 192
# underrated the server (docs/fidelity.md).
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
make_models
log "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
VER=$(python3 -c "import vllm; print(vllm.__version__)")
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)   # e.g. "NVIDIA H100 80GB HBM3"
TAGG=$(echo "$GPU" | grep -oiE "h100|h200|a100|l40s|b200" | head -1 | tr A-Z a-z); TAGG=${TAGG:-gpu}
log "vllm $VER"
for spec in ${MODELS:-m8b:llama-3.1-8b}; do
  dir=${spec%%:*}; name=${spec#*:}
  t0=$(date +%s)
  if ensure_vllm "$K/$dir" "$name" 8000; then
    cold=$(( $(date +%s) - t0 ))
    # Stop (keeping the raw data) before the device call's 600 s limit.
    timeout -s INT $(( ${CALL_LIMIT_S:-585} - $(date +%s) + T0 )) python3 -c "$PROFILE_PY" "$name" --url http://127.0.0.1:8000 --out "$OUT/$TAGG-$name.yaml" --raw "$OUT/raw-$name.json" \
      --gpu "$GPU" --flags "vllm $VER: $VLLM_FLAGS (torch.compile + CUDA graphs)" --sleep \
      --prompt-lengths 128,256,512,768,1024,1536,2048,3072,4096,6144,8000 --reps 3 \
      --batches 1,8,32,64,128,192,256 --contexts 128,1024 --output-tokens 128 \
      --mixed-batches ${MIXED_BATCHES:-32,96,160,224} --mixed-contexts 512,1536 --mixed-lengths 256,1024,2048 \
      --no-frontend --load-streams ${LOAD_STREAMS:-0,64,128,192,320} --load-rates ${LOAD_RATES:-4,12,20} \
      $( [ "$cold" -gt 30 ] && echo --load-cold-s "$cold" ) 2>&1 | grep -vE "━" | tail -60
    cp "$OUT/$TAGG-$name.yaml" "$K/" 2>/dev/null   # for fidelity_h200.sh on this warm machine (PROFILE_FROM)
    [ "$name" = llama-3.1-8b ] || stop_vllm   # the 8B server stays up for fidelity_h200.sh
  fi
done
log "done"
