#!/bin/bash
# One device call: profile a Llama-3.1-8B and a Llama-3.2-3B shape (dummy weights) on the H200 with real vLLM.
# run(command="bash bench/device/profile_h200.sh", carry=[".vllmkit/bin", ".vllmkit/p0"])
set -u
source bench/device/vllm_env.sh
make_models
log "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
VER=$(python3 -c "import vllm; print(vllm.__version__)")
log "vllm $VER"
for spec in "m3b llama-3.2-3b" "m8b llama-3.1-8b"; do
  set -- $spec
  if start_vllm "$K/$1" "$2" 8000; then
    profile_cmd "$2" --url http://127.0.0.1:8000 --out "$OUT/h200-$2.yaml" --raw "$OUT/raw-$2.json" \
      --gpu "NVIDIA H200" --flags "vllm $VER: $VLLM_FLAGS (torch.compile + CUDA graphs)" --sleep \
      --prompt-lengths 128,512,1024,2048,4096,8000 --batches 1,8,32,64,128,256 --contexts 128,1024 \
      --output-tokens 128 --reps 3 2>&1 | tail -40
    [ "$2" = llama-3.1-8b ] || stop_vllm   # the 8B server stays up for fidelity_h200.sh
  fi
done
log "done"
