"""What a one-token probe costs the engine, window by window, for `bench/device/probe_cost.sh`.

    python bench/device/probe_cost.py --url http://127.0.0.1:8010 --label async -o F.json

At 12-19 probes a second beside 128-256 streams, vLLM's steps ran 25-45 % longer than the step model says
(docs/fidelity.md, "A sixth host"). These windows vary one thing at a time to tell why: the probe's output (1 token
finishes in its prefill step; 4 do not), its length at the same prompt tokens per second (512 tokens at twice the
rate: a cost per request, or per token), (the caller restarts the server) asynchronous scheduling, prompts sent as
words, load streams parsed as a replay client parses them, and load streams read by another process (so that the
probes' client does nothing else: profile-model's own client spends 0.4-0.8 CPU s/s on its load streams). Per
window: the client's and vLLM's TTFT, vLLM's queue + prefill, the steps (vLLM's iteration-token histogram: count =
steps the API server saw) and the streams' inter-token latency, the API server's, the engine core's and this
client's CPU, and the window's wall-clock bounds (to read GPU clocks and utilisation from an nvidia-smi log
against).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from qlmctl.client.prober import ITL_HISTOGRAM, Profiler
from qlmctl.engines.totals import engine_totals_delta

HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
              "vllm:request_prefill_time_seconds", ITL_HISTOGRAM, "vllm:iteration_tokens_total")
PLAN = [  # (streams, probe tokens, probe output tokens, rates, variant)
    (128, 1024, 1, (6.0, 12.0, 19.0), ""),
    (128, 1024, 4, (6.0, 12.0, 19.0), ""),
    (128, 512, 1, (12.0, 24.0, 38.0), ""),
    (256, 1024, 1, (3.0, 10.0, 19.0), ""),
    (0, 1024, 1, (6.0, 19.0), ""),
    (128, 1024, 1, (6.0, 19.0), "text"),  # probes as words for the server to tokenize, as replays send them
    (128, 1024, 1, (6.0, 19.0), "parsed"),  # the streams read and parsed event by event, as a replay client does
    (128, 1024, 1, (4.0, 12.0, 19.0), "split"),  # the streams read by another process: the probes' client idles
    (256, 1024, 1, (3.0, 10.0, 19.0), "split"),
    (240, 1024, 1, (6.0, 19.0), "split"),  # 9, 10: as the replays near saturation meet it (200-256 streams),
    (240, 1024, 1, (6.0, 19.0), "split-text"),  # with token ids, then words
]
"""`variant`: "" token-id probes beside streams whose bytes are dropped unread (profile-model's windows)."""

def engine_core_cpu_s() -> float:
    """CPU seconds (user + system) of every process whose command line names vLLM's engine core."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            # vLLM names the process VLLM::EngineCore (setproctitle); comm keeps 15 characters of it.
            if "EngineCor" not in Path(f"/proc/{pid}/comm").read_text() and \
                    b"EngineCore" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


def _load_process(url: str, model: str, streams: int) -> None:
    """A child process that keeps `streams` load streams open (their bytes dropped) until it is terminated."""
    async def run() -> None:
        prof = Profiler(url, model, seed=1)
        await asyncio.gather(*(prof._raw_stream(512, 4000) for _ in range(streams)))

    asyncio.run(run())


async def windows(prof: Profiler, label: str, streams: int, probe_tokens: int, probe_out: int,
                  rates: tuple[float, ...], window_s: float, variant: str) -> list[dict]:
    prompted = await prof.counter("vllm:prompt_tokens")
    load = prof.stream if variant == "parsed" else prof._raw_stream
    child = None
    split, text = variant.startswith("split"), variant.endswith("text")
    if split and streams:
        child = mp.get_context("spawn").Process(target=_load_process, args=(str(prof.url), prof.model, streams),
                                                 daemon=True)
        child.start()
        loads: list[asyncio.Task] = []
    else:
        loads = [asyncio.create_task(load(512, 4000)) for _ in range(streams)]
    out: list[dict] = []
    try:
        await prof._wait_prefilled(prompted, streams * 512)
        await asyncio.sleep(0.5)
        for rate in rates:
            core0, own0, wall0 = engine_core_cpu_s(), time.process_time(), time.time()
            ttfts, before, after, elapsed = await prof.probe_window(
                rate, window_s, probe_tokens, HISTOGRAMS, ("process_cpu_seconds",), probe_out, text)
            core = (engine_core_cpu_s() - core0) / elapsed
            own = (time.process_time() - own0) / elapsed
            if any(t.done() for t in loads) or (child is not None and not child.is_alive()):
                raise RuntimeError(f"a load stream ended early ({streams} streams)")
            d = engine_totals_delta(before, after) if before and after else {}
            rec = {"label": label, "variant": variant, "streams": streams, "probe_tokens": probe_tokens,
                   "probe_out": probe_out,
                   "rate_rps": len(ttfts) / elapsed, "probes": len(ttfts), "elapsed_s": elapsed,
                   "wall_t0": wall0, "wall_t1": wall0 + elapsed, "client_ttft_s": float(np.mean(ttfts)),
                   "engine_core_cpu_per_s": core, "client_cpu_per_s": own}
            for name, h in d.items():
                rec[name] = h
            out.append(rec)
            it = d.get("vllm:iteration_tokens_total", {})
            itl = d.get(ITL_HISTOGRAM, {})
            print(f"{label}{'/' + variant if variant else ''} streams={streams} probe={probe_tokens}x{probe_out} "
                  f"rate={rec['rate_rps']:.1f} "
                  f"ttft={rec['client_ttft_s'] * 1e3:.1f}ms steps/s={it.get('count', 0) / elapsed:.1f} "
                  f"tokens/step={it.get('mean') or 0:.0f} itl={(itl.get('mean') or 0) * 1e3:.1f}ms "
                  f"core_cpu={core:.2f} client_cpu={own:.2f}", flush=True)
    finally:
        if child is not None:
            child.terminate()  # its connections close: vLLM aborts the streams
            child.join(10)
        await prof._stop(loads)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--label", required=True, help="names this server's setting in the output")
    ap.add_argument("--window-s", type=float, default=4.0)
    ap.add_argument("--plan", default="all", help="'all' or comma-separated indices into PLAN")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    plan = PLAN if args.plan == "all" else [PLAN[int(i)] for i in args.plan.split(",")]
    prof = Profiler(args.url, args.model)
    got: list[dict] = []
    try:
        for streams, tokens, outs, rates, variant in plan:
            got.extend(await windows(prof, args.label, streams, tokens, outs, rates, args.window_s, variant))
    finally:
        await prof.close()
        Path(args.out).write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
