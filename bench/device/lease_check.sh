#!/bin/bash
# Two device calls on one warm machine (issue 18): a profile measured by `qlmctl profile-model` (its sustained-load
# run included) and replays of the unseen traffic on the same server, so that the simulation with that profile is
# checked against the host it was measured on (earlier checks set one host's profile against another's replays).
# vLLM's defaults as the unseen replays ran them, prefix caching off (the replays repeat their prompts).
#   run(command="STAGE=1 bash bench/device/lease_check.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       start vLLM, profile-model with fewer points than profile_h200.sh (its API-server windows up to 256 streams)
#   run(command="STAGE=2 bash bench/device/lease_check.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       the same server (a warm machine): code completion near and over, conversation near and over, fcfs; then
#       the conversation near through `qlmctl serve` (fcfs)
#   run(command="STAGE=3 bash bench/device/lease_check.sh", carry=[".vllmkit/bin", ".vllmkit/p0", ".whl"])
#       the server restarted with --scheduling-policy priority (~100 s): the four replays again, priorities sent
# Compare here (the profile from stage 1's $OUT):
#   python bench/fidelity_compare.py DIR/code --scenario scenarios/fidelity_code.yaml --loads near:16:320,over:22:440 \
#       --policies direct --profile PROFILE --set enable_prefix_caching=false
# (stage 3's folders, unpacked beside stage 2's: --policies direct,direct@priority; the gateway run: add fcfs)
set -u
PREFIX_CACHING=off source bench/device/vllm_env.sh
default_server
VER=$(python3 -c "import vllm; print(vllm.__version__)")
EXTRA=; [ "${STAGE:-1}" = 3 ] && EXTRA="--scheduling-policy priority"
ensure_vllm "$K/m8b" llama-3.1-8b $PORT $EXTRA || exit 4  # (stage 3 restarts stage 2's server in priority mode)
replays() {  # $1: the folder under $OUT; rest: replay_direct.py's extra flags
  local dest=$1; shift
  local extra=("$@")
  for spec in "code near 16 320" "code over 22 440" "unseen near 21.5 540" "unseen over 43 1075"; do
    set -- $spec
    log "direct $1/$2: $3 req/s, $4 requests ${extra[*]-}"
    timeout 200 python3 bench/device/replay_direct.py -s "scenarios/fidelity_$1.yaml" --url $URL --rate "$3" -n "$4" \
      -o "$dest/$1/$2" ${extra[@]+"${extra[@]}"} 2>&1 | grep -vE "━|^\s*$" | tail -1
  done
}
case ${STAGE:-1} in
1)
  timeout -s INT $(( ${CALL_LIMIT_S:-585} - $(date +%s) + T0 )) python3 -c "$PROFILE_PY" llama-3.1-8b --url $URL \
    --out "$OUT/$TAGG-lease.yaml" --raw "$OUT/raw-lease.json" --gpu "$GPU" \
    --flags "vllm $VER: $VLLM_FLAGS (torch.compile + CUDA graphs)" --max-num-seqs 1024 --max-num-batched-tokens 8192 \
    --prompt-lengths 256,512,1024,2048,4096,8000 --reps 2 --batches 1,32,128,256 --contexts 128,1024 \
    --mixed-batches 32,160 --mixed-contexts 512 --mixed-lengths 256,2048 --no-frontend \
    --load-streams 0,128,256 --load-rates 4,20 --load-window-s 4 --sustained-s 20 2>&1 | grep -vE "━" | tail -45
  ;;
2)
  R="$OUT/lease"
  replays "$R"
  log "through the gateway: conversation near, fcfs"
  timeout 200 python3 -c "from qlmctl.cli import main; main()" serve -s scenarios/fidelity_unseen.yaml --replay \
    --client-procs 4 --rate 21.5 -n 540 -p fcfs -o "$R/unseen/near" 2>&1 | grep -vE "━|^\s*$" | tail -3
  mv "$R/unseen" "$R/conv" 2>/dev/null
  tar czf "$OUT/lease.tgz" -C "$R" . && rm -rf "$R"
  ;;
3)
  R="$OUT/lease"
  replays "$R" --priority
  mv "$R/unseen" "$R/conv" 2>/dev/null
  tar czf "$OUT/lease_priority.tgz" -C "$R" . && rm -rf "$R"
  ;;
esac
log done
