"""bench/device/probe_cost.sh's windows against the simulated engine: steps, TTFT parts, CPU and GPU clock.

    python bench/probe_cost_compare.py docs/fidelity/probe-cost-h100 --profile PROFILE.yaml

Per window: live steps per second (vLLM's iteration-token histogram: one observation per engine step the API
server saw) and the streams' mean inter-token latency, against the simulated engine alone over the same window
(`frontend_windows.window_steps`); the engine time each probe adds beyond the streams' decode-only steps, live and
simulated; vLLM's queue + prefill and TTFT; the API server's and the engine core's CPU (s/s); and the GPU's mean SM
clock, utilisation and power over the window (nvidia-smi every 200 ms).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

# bench/, this script's folder, is on the path; its device/ folder holds the nvidia-smi log reader
from frontend_windows import scenario, window_steps

sys.path.insert(0, str(Path(__file__).resolve().parent / "device"))
from smi_phases import SmiSample, read_smi  # noqa: E402


def smi_rows(folder: Path) -> list[SmiSample]:
    """The samples of the folder's smi.csv (or smi.csv.gz); none without one."""
    path = folder / "smi.csv"
    if path.exists():
        return read_smi(path.open())
    if path.with_suffix(".csv.gz").exists():
        return read_smi(gzip.open(path.with_suffix(".csv.gz"), "rt"))
    return []


def mean_of(h: dict | None) -> float:
    return float(h["mean"]) if h and h.get("mean") is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="probe_cost.sh's $OUT: probe_*.json and smi.csv")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    sc = scenario(args.profile, {})
    smi = smi_rows(args.folder)
    print("| server / variant | streams | probe tokens x out | probes/s | live steps/s | sim steps/s | live ITL (ms) "
          "| sim step (ms) | engine ms per probe, live / sim | vLLM queue+prefill (ms) | vLLM TTFT (ms) "
          "| client TTFT (ms) | API CPU | core CPU | SM MHz | GPU util % | W |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs: dict[tuple, list[dict]] = {}  # the windows beside one set of streams, in order
    for f in sorted(args.folder.glob("probe_*.json")):
        for w in json.loads(f.read_text()):
            key = (f.name, w["label"], w.get("variant", ""), w["streams"], w["probe_tokens"], w["probe_out"])
            runs.setdefault(key, []).append(w)
    for ws in runs.values():
        first = ws[0]["wall_t0"]
        spec = [(w["wall_t0"] - first, w["elapsed_s"], w["rate_rps"], w["probe_tokens"], w["probe_out"]) for w in ws]
        sims = [window_steps(sc, ws[0]["streams"], spec, k) for k in range(args.seeds)]
        idle = window_steps(sc, ws[0]["streams"], [(x[0], x[1], 1e-9, 1, 1) for x in spec], 0)
        for j, w in enumerate(ws):
            el = w["elapsed_s"]
            it = w.get("vllm:iteration_tokens_total") or {}
            live_sps = it.get("count", float("nan")) / el
            sim_sps = float(np.mean([s[j][0] for s in sims]))
            sim_step = float(np.mean([s[j][1] for s in sims]))
            per = ""
            if w["streams"]:
                # Engine time per probe: what the window's steps took beyond as many decode-only steps (of the
                # simulated streams at that age alone; live decode steps agree within a few per cent).
                d = idle[j][1]
                per = f"{(1 - live_sps * d) / w['rate_rps'] * 1e3:.1f} / {(1 - sim_sps * d) / w['rate_rps'] * 1e3:.1f}"
            qp = mean_of(w.get("vllm:request_queue_time_seconds")) + mean_of(w.get("vllm:request_prefill_time_seconds"))
            sel = [s for s in smi if w["wall_t0"] <= s.t <= w["wall_t1"]]
            clock, power, util = (float(np.mean([getattr(s, f) for s in sel])) if sel else float("nan")
                                  for f in ("sm_mhz", "power_w", "util_pct"))
            api = w.get("process_cpu_seconds")
            server = w["label"] + (f"/{w['variant']}" if w.get("variant") else "")
            print(f"| {server} | {w['streams']} | {w['probe_tokens']} x {w['probe_out']} | {w['rate_rps']:.1f} "
                  f"| {live_sps:.1f} | {sim_sps:.1f} | {mean_of(w.get('vllm:inter_token_latency_seconds')) * 1e3:.1f} "
                  f"| {sim_step * 1e3:.1f} | {per} | {qp * 1e3:.1f} "
                  f"| {mean_of(w.get('vllm:time_to_first_token_seconds')) * 1e3:.1f} | {w['client_ttft_s'] * 1e3:.1f} "
                  f"| {api / el if api is not None else float('nan'):.2f} | {w['engine_core_cpu_per_s']:.2f} "
                  f"| {clock:.0f} | {util:.0f} | {power:.0f} |")


if __name__ == "__main__":
    main()
