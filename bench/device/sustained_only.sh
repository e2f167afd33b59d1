#!/bin/bash
# One short device call (issue 18: the H200 profile has no sustained-load term): vLLM with the bundled H200 profile's
# flags, then `profile-model` with a handful of step points and its sustained-load run only (20 s, 32 decoders beside
# prompts that keep every step full). The sustained windows are read against the committed profile here:
#   run(command="bash bench/device/sustained_only.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"], needs_h200=true)
#   python bench/device/sustained_fit.py RAW --profile scenarios/profiles/h200-llama-3.1-8b.yaml
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
make_models
gpu_tag
VER=$(python3 -c "import vllm; print(vllm.__version__)")
log "gpu: $GPU; flags: $VLLM_FLAGS"
ensure_vllm "$K/m8b" llama-3.1-8b 8000 || exit 4
timeout -s INT $(( ${CALL_LIMIT_S:-585} - $(date +%s) + T0 )) python3 -c "$PROFILE_PY" llama-3.1-8b \
  --url http://127.0.0.1:8000 --out "$OUT/$TAGG-sustained.yaml" --raw "$OUT/raw-sustained.json" --gpu "$GPU" \
  --flags "vllm $VER: $VLLM_FLAGS (torch.compile + CUDA graphs)" --prompt-lengths 512,2048,4096 --reps 1 \
  --batches 1,32,128 --contexts 128 --no-mixed --no-frontend --no-frontend-load --sustained-s 20 2>&1 \
  | grep -vE "━" | grep -E "sustained|KV|error" | tail -8
log done
