# Sourced by the device scripts: unpack the vLLM bundle (carried as .vllmkit/p0) once, make model folders,
# and define start/stop helpers for `vllm serve` with dummy weights. Run from the repo root on the GPU host.
# A call carries the tree and the bundle in 64 MiB: move docs/figures aside for it (docs/fidelity.md, Procedure).
K=${K:-/root/vk}; OUT=${OUT:-/tmp/vkout}; mkdir -p "$K/parts" "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ ! -f "$K/site/vllm/__init__.py" ]; then
  cp .vllmkit/p*/bundle.part* "$K/parts/"
  log "unpacking vLLM bundle"
  cat $(ls "$K"/parts/bundle.part* | sort -V) | python3 -c "
import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall(sys.argv[1])" "$K"
fi
make_models() {
  [ -f "$K/m8b/config.json" ] || python3 .vllmkit/bin/make_model.py "$K/m8b" >/dev/null
  if [ ! -f "$K/m3b/config.json" ]; then
    python3 .vllmkit/bin/make_model.py "$K/m3b" >/dev/null
    # Llama-3.2-3B shape: narrower, fewer layers, tied embeddings.
    python3 - "$K/m3b/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c.update(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
         num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
c["rope_scaling"]["factor"] = 32.0
json.dump(c, open(p, "w"), indent=2)
PY
  fi
}
export PYTHONPATH=$K/site:$PWD PYTHONUNBUFFERED=1 VLLM_SERVER_DEV_MODE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
# qlmctl's own dependencies the bundle lacks (orjson, ...): their wheels, carried as .whl
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
VLLM_FLAGS="--load-format dummy --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 --max-num-batched-tokens 8192 --enable-sleep-mode"
# Replays of one trace repeat its prompts run after run; vLLM's prefix cache would then skip most prefill
# work for every run but the first, which the simulator does not model. Fidelity runs turn it off.
[ "${PREFIX_CACHING:-on}" = off ] && VLLM_FLAGS="$VLLM_FLAGS --no-enable-prefix-caching"
SPID=
start_vllm() {  # $1 model dir, $2 served name, $3 port, rest: extra flags (TAG=...: log/pgid name, else the served name)
  local id="$VLLM_FLAGS $*"
  local dir=$1 name=$2 port=$3; shift 3
  local tag=${TAG:-$name}
  log "starting vllm serve $name on :$port"
  setsid python3 -m vllm.entrypoints.cli.main serve "$dir" --served-model-name "$name" $VLLM_FLAGS \
    --host 127.0.0.1 --port "$port" "$@" > "$OUT/server_$tag.log" 2>&1 &
  SPID=$!; echo $SPID > "$K/server_$tag.pgid"
  # What `ensure_vllm` compares before it reuses this server: its process group, then how it was started.
  printf '%s\n%s\n' "$SPID" "$id" > "$K/port_$port"
  local t=0
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; do
    sleep 2; t=$((t + 2))
    if ! kill -0 $SPID 2>/dev/null; then log "server died"; tail -30 "$OUT/server_$tag.log"; return 1; fi
    if [ $t -ge ${HEALTH_LIMIT:-240} ]; then log "health timeout"; tail -30 "$OUT/server_$tag.log"; return 1; fi
  done
  log "healthy after ${t}s"
  grep -E "KV cache|Maximum concurrency|Model loading took|Graph capturing" "$OUT/server_$tag.log" | sed 's/^.*\] //' | cut -c1-150
}
ensure_vllm() {  # like start_vllm, unless a server started the same way (flags, model, extra flags) answers on that
  # port (a warm machine); one started otherwise (say with --scheduling-policy priority, or prefix caching on) is
  # stopped first
  if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$3/health', timeout=2)" 2>/dev/null; then
    if [ "$(sed -n 2p "$K/port_$3" 2>/dev/null)" = "$VLLM_FLAGS $*" ]; then
      log "reusing the vllm server on :$3"; return 0
    fi
    local pg; pg=$(sed -n 1p "$K/port_$3" 2>/dev/null)
    [ -n "$pg" ] || { log "a server these scripts did not start answers on :$3"; return 1; }
    log "stopping the server on :$3 (started otherwise)"; kill -- -"$pg" 2>/dev/null; sleep 6
  fi
  start_vllm "$@"
}
watch_cpu() {  # CPU use of vLLM's API server, its engine core and qlmctl, every 2 s, into $OUT/top.log
  (while sleep 2; do echo "t=$(( $(date +%s) - T0 ))"; top -b -n 1 -w 160 | grep -E "python|VLLM" | head -8; done) \
    > "$OUT/top.log" 2>&1 &
}
gpu_tag() {  # GPU: the card's name; TAGG: h100 or h200 (the bundled profile named after it; h200 otherwise)
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  TAGG=$(echo "$GPU" | grep -oiE "h100|h200" | head -1 | tr A-Z a-z); TAGG=${TAGG:-h200}
}
# vLLM's defaults as the unseen replays ran them (--max-num-seqs 1024 and 8,192-token steps on an H100/H200), the
# profile's context length, sleep mode, prefix caching off (replays repeat their prompts): the sustained-load scripts.
DEFAULT_FLAGS="--load-format dummy --dtype bfloat16 --max-model-len 8192 --enable-sleep-mode --no-enable-prefix-caching"
default_server() {  # the sustained-load scripts' setting: DEFAULT_FLAGS on :8010 (PORT, URL), models made, GPU named
  VLLM_FLAGS=$DEFAULT_FLAGS
  PORT=8010
  URL=http://127.0.0.1:$PORT
  make_models
  gpu_tag
  log "gpu: $GPU; flags: $VLLM_FLAGS"
}
watch_gpu() {  # $1: CSV file; the SM clock, power, temperature and throttle reasons every 200 ms (SMI: its pid)
  local fields=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu
  local reasons=clocks_event_reasons.active
  nvidia-smi --query-gpu=$reasons --format=csv,noheader >/dev/null 2>&1 || reasons=clocks_throttle_reasons.active
  nvidia-smi --query-gpu=$fields,$reasons --format=csv -lms 200 > "$1" 2>&1 &
  SMI=$!
}
stop_vllm() { [ -n "$SPID" ] && kill -- -$SPID 2>/dev/null; sleep 4; kill -9 -- -$SPID 2>/dev/null; SPID=; }
qlm() { python3 -c "from qlmctl.cli import main; main()" "$@"; }
PROFILE_PY="import typer; from qlmctl.commands.profile import profile_model; typer.run(profile_model)"
profile_cmd() { python3 -c "$PROFILE_PY" "$@"; }
