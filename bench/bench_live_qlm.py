"""qlm live against what a vLLM operator already has, on prefill-bound traffic (scenarios/prefill_bound.yaml).

Four runs of the same requests, each against a fresh engine:
  fcfs-alone      the engine alone, vLLM's default scheduling (client straight to it)
  priority-alone  the engine alone with --scheduling-policy priority, the client sending each class's priority
  qlm             qlm through `qlmctl serve`, the engine in fcfs mode
  qlm+priority    qlm through `qlmctl serve`, the engine in priority mode (qlm sets each request's priority)

    python bench/bench_live_qlm.py                      # emulated engines (qlmctl emulate) at 4x real time
    python bench/bench_live_qlm.py --rate 26 -n 1500 --speedup 4
    python bench/bench_live_qlm.py --vllm-fcfs http://127.0.0.1:8000 --vllm-priority http://127.0.0.1:8001
                                                        # real vLLM servers (bench/device/qlm_live_h200.sh)

Prints per-class SLO attainment and TTFT p50/p90 and writes each run's results under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "prefill_bound.yaml"
MODEL = "llama-3.1-8b"


def scenario(rate: float, n: int, url: str, speedup: float, engine_policy: str) -> Any:
    from qlmctl.scenario import load_scenario

    return load_scenario(SCENARIO, {
        "workload": {"synthetic": {"rate_rps": rate, "num_requests": n}},
        "cluster": {"instances": [{"name": "gpu0", "gpu": "H200", "model": MODEL,
                                   "profile_overrides": {"max_num_seqs": 1024},
                                   "engine": {"scheduling_policy": engine_policy}}]},
        "live": {"engines": [{"instance": "gpu0", "model": MODEL, "url": url}], "port": 0, "speedup": speedup},
    })


async def direct(url: str, sc: Any, requests: list, speedup: float, send_priority: bool) -> dict:
    from qlmctl.client.replay import replay_in_subprocess
    from qlmctl.metrics import summarize

    res = await replay_in_subprocess(url, requests, speedup=speedup, send_priority=send_priority)
    return summarize(res.requests)


async def gateway(sc: Any, requests: list) -> dict:
    from qlmctl.gateway.run import run_live

    run = await run_live(sc, "qlm", requests)
    return run.summary


def row(name: str, s: dict) -> str:
    by = s["slo_attainment_by_class"]
    return (f"| {name} | {100 * s['slo_attainment']:.1f} % | " + " | ".join(f"{100 * by.get(c, 0):.1f} %"
            for c in ("interactive", "batch")) + f" | {(s.get('median_ttft_ms') or 0) / 1000:.2f} | "
            f"{(s.get('p90_ttft_ms') or 0) / 1000:.2f} | {s['completed']}/{s['num_requests']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=26.0, help="offered rate, requests per scenario second")
    ap.add_argument("-n", type=int, default=1500, help="requests per run")
    ap.add_argument("--speedup", type=float, default=4.0, help="emulated engines' speed-up (1 for real vLLM)")
    ap.add_argument("--vllm-fcfs", help="a running vLLM server in fcfs mode (else an emulator is started)")
    ap.add_argument("--vllm-priority", help="a running vLLM server with --scheduling-policy priority")
    ap.add_argument("--out", type=Path, default=Path("results/bench_live_qlm"))
    ap.add_argument("--runs", default="fcfs-alone,priority-alone,qlm,qlm+priority")
    args = ap.parse_args()

    from qlmctl.emulator.testing import local_emulators
    from qlmctl.workload import build_requests

    real = args.vllm_fcfs is not None
    speedup = 1.0 if real else args.speedup
    results: dict[str, dict] = {}
    for name in args.runs.split(","):
        prio = "priority" in name
        if real:
            url = args.vllm_priority if prio else args.vllm_fcfs
            sc = scenario(args.rate, args.n, url, speedup, "priority" if prio else "fcfs")
            reqs, _ = build_requests(sc)
            results[name] = asyncio.run(gateway(sc, reqs) if name.startswith("qlm")
                                        else direct(url, sc, reqs, speedup, prio))
        else:
            prof = scenario(args.rate, args.n, "http://x", speedup, "fcfs").profile(MODEL)
            with local_emulators([(prof, MODEL)], speedup=speedup, policy="priority" if prio else "fcfs") as (emu,):
                sc = scenario(args.rate, args.n, emu.url, speedup, "priority" if prio else "fcfs")
                reqs, _ = build_requests(sc)
                results[name] = asyncio.run(gateway(sc, reqs) if name.startswith("qlm")
                                            else direct(emu.url, sc, reqs, speedup, prio))
        print(row(name, results[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summaries.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(f"| run ({'vLLM' if real else f'emulated, {speedup:g}x'}, {args.rate:g} req/s, {args.n} requests) "
          "| SLO attainment | interactive (2 s) | batch (30 s) | TTFT p50 (s) | TTFT p90 (s) | completed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        print(row(name, s))


if __name__ == "__main__":
    main()
