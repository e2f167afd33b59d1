#!/bin/bash
# The simulator benchmarks (bench/bench_simulate.py) on the device host's CPU, pinned to two cores, at HEAD and at
# an earlier commit unpacked in .bench_old (e.g. `git archive 65d5a0c qlmctl simulator bench scenarios traces
# pyproject.toml | tar x -C .bench_old`), alternating: a second machine's absolute figures, and the ratio of the two
# commits on one machine. The Azure trace comes in .bench_shared/ (from ../shared/traces). No GPU is used; the vLLM
# bundle is unpacked only for the Python packages it carries.
# run(command="bash bench/device/cpu_bench.sh", carry=[".vllmkit/p0", ".bench_old", ".bench_shared"], timeout_s=600)
set -u
source bench/device/vllm_env.sh
for d in ../shared/traces shared/traces; do mkdir -p $d && cp .bench_shared/azure_llm_2023_conv.csv $d/; done
lscpu | grep -E "Model name|^CPU\(s\)|MHz" | head -4; python3 -V
CORES=${CORES:-2,3}
run_at() {  # $1: the checkout (. or .bench_old), $2: the bench's points
  (cd "$1" && PYTHONPATH=$K/site:$PWD taskset -c $CORES python3 bench/bench_simulate.py "$2" 2>&1 | grep -E '^\{')
}
for rep in 1 2; do
  log "azure HEAD ($rep)"; run_at . azure
  log "azure old ($rep)"; run_at .bench_old azure
done
log "million HEAD"; run_at . million
log "million old"; run_at .bench_old million
log done
