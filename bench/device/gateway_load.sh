#!/bin/bash
# Issue 19: the gateway at fleet scale, on a 16-core host (no GPU needed: emulated engines on the host's CPUs).
# Run it with the repository and two small carried folders:
#   bash bench/device/make_dep.sh; run(command="bash bench/device/gateway_load.sh", carry=[".whl", ".dep"], timeout_s=600)
# CPUs split so that no part steals another's: gateway (QLM core + relay workers) 0-8, four emulated engines
# 9-12, three client processes 13-15. Two gateways measured the same way, --workers 8 and --workers 1 (today's
# single process): serial added TTFT, 2,000 streams arriving within 2 s (added TTFT p50/p99 over the same burst
# sent directly to the engines, and the core's decision latency from its qlm_core_decision_seconds histogram),
# and streamed tokens per second (384 streams of 4,000 tokens). Targets (#19): with 8 workers, added TTFT
# <= 5 ms p50 and <= 25 ms p99 in the burst, >= 250,000 tokens/s, core decision < 1 ms p50.
# Figures go to $OUT/gateway_load_w8.json and _w1.json, the tables to stdout (about 4-5 minutes in all).
# Needs the project's Python dependencies (numpy, orjson, pyyaml, rich, uvicorn, typer, prometheus_client, httpx,
# pydantic); where they are missing, a carried .dep/ folder or the vLLM bundle's site-packages provide them.
set -u
OUT=${OUT:-/tmp/gateway_load}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "import numpy, orjson, yaml, rich, uvicorn, starlette, typer, prometheus_client, httpx, pydantic" 2>/dev/null; then
  # .dep/ (bench/device/make_dep.sh; carried, gitignored): the GPU image lacks uvicorn, pydantic (+core, cp312), typer and a few small
  # ones; a plain folder of them, taken from the vLLM bundle and a local install, is 9 MB against the
  # bundle's 50 (which does not fit beside the repository in one call's carry).
  if [ -d .dep ]; then export PYTHONPATH=$PYTHONPATH:$PWD/.dep
  elif [ -d .vllmkit ]; then source bench/device/vllm_env.sh; fi
  # orjson is not in the vLLM bundle: carry its wheel in .whl/ (cp312 manylinux).
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import numpy, orjson, yaml, rich, uvicorn, starlette, typer, prometheus_client, httpx, pydantic" || {
  echo "missing Python dependencies (see above)"; exit 2; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true
COMMON="--engines 4 --max-num-seqs 1024 --only ttft,burst,tokens --ttft-samples 200 --burst 2000 --burst-window 2
        --burst-tokens 32 --streams 384 --stream-tokens 4000 --client-procs 3
        --cpus-gateway 0-8 --cpus-engines 9-12 --cpus-client 13-15"
for W in ${WORKERS:-8 1}; do  # WORKERS="8": one half only
  echo "=== --workers $W"
  timeout 280 python3 bench/bench_gateway.py --workers $W $COMMON --json "$OUT/gateway_load_w$W.json" || echo "exit $?"
done
