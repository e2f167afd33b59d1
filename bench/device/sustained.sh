#!/bin/bash
# One device call (issue 18, overload TTFT 12-23 % low in simulation, which needs steps 1-3 % slower to match):
# does the GPU run slower under sustained overload than in the short bursts `profile-model` times? The SM clock,
# power and throttle reasons are logged every 200 ms throughout, while
#   A. steps are timed against the step model (bench/device/multi_prefill.py: decode-only steps beside 96 decoders,
#      and the extra of 1 and 4 prompts of ~2k tokens in one step), on an engine that was idle;
#   B. the overloaded code-completion replay runs twice back to back, then the conversation at 8x (the unseen
#      replays' over-saturation cells, straight to vLLM, fcfs);
#   C. the same step timings as A, right after.
# vLLM's defaults as the unseen replays ran them, but prefix caching off (the replays repeat their prompts).
# run(command="bash bench/device/sustained.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"], timeout_s=600)
# Writes $OUT/smi.csv, $OUT/phases.txt, $OUT/steps_{cold,hot}.json and $OUT/sustained.tgz (<set>/<load>/<label>/
# as bench/fidelity_compare.py reads them).
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
default_server
start_vllm "$K/m8b" llama-3.1-8b $PORT || exit 4
watch_gpu "$OUT/smi.csv"
phase() { echo "$(date +%s.%N) $*" >> "$OUT/phases.txt"; log "phase: $*"; }
steps() {  # $1: cold|hot
  phase "steps-$1"
  timeout 150 python3 bench/device/multi_prefill.py --url $URL --batch 96 --ctx 128 --decode-tokens 1600 \
    --reps 3 --points 1x2048,4x1900 --profile scenarios/profiles/$TAGG-llama-3.1-8b.yaml \
    --out "$OUT/steps_$1.json" 2>&1 | tail -3
  phase "steps-$1-end"
}
R="$OUT/sustained"
replay() {  # set load rate n label
  phase "replay-$1-$2-$5"
  timeout 200 python3 bench/device/replay_direct.py -s "scenarios/fidelity_$1.yaml" --url $URL --rate "$3" -n "$4" \
    -o "$R/$1/$2" --label "$5" 2>&1 | grep -vE "━|^\s*$" | tail -2
  phase "replay-$1-$2-$5-end"
}
steps cold
replay code over 22 440 direct
replay code over 22 440 direct-2
replay unseen over 43 1075 direct
steps hot
kill $SMI 2>/dev/null
mv "$R/unseen" "$R/conv" 2>/dev/null
tar czf "$OUT/sustained.tgz" -C "$R" . && rm -rf "$R"
python3 bench/device/smi_phases.py "$OUT/smi.csv" "$OUT/phases.txt"
log done
