"""Compare live replays (real vLLM through `qlmctl serve`) with `qlmctl simulate` on the same workload.

    python bench/fidelity_compare.py LIVE_DIR [--out docs/fidelity.md]

LIVE_DIR holds one folder per load (light, near, over), each with one results folder per policy, as
bench/device/fidelity_h200.sh writes them. The simulated side replays the same scenario, trace, rate,
request count and seed with the measured profile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlmctl.runner import simulate
from qlmctl.scenario import load_scenario
from qlmctl.workload import build_requests

REPO = Path(__file__).resolve().parents[1]
LOADS = {"light": (8, 240), "near": (20, 600), "over": (32, 960)}
METRICS = [("TTFT p50 (ms)", "p50_ttft_ms"), ("TTFT p90 (ms)", "p90_ttft_ms"), ("TPOT p50 (ms)", "p50_tpot_ms"),
           ("TPOT p90 (ms)", "p90_tpot_ms"), ("E2EL p50 (ms)", "p50_e2el_ms"), ("E2EL p90 (ms)", "p90_e2el_ms"),
           ("throughput (req/s)", "request_throughput"), ("SLO attainment", "slo_attainment")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("live", type=Path)
    ap.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "fidelity_h200.yaml")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = ["| load | policy | metric | live | simulated | error |", "|---|---|---|---:|---:|---:|"]
    worst: dict[str, float] = {}
    for load, (rate, n) in LOADS.items():
        sc = load_scenario(args.scenario, {"workload": {"target_rate_rps": rate, "max_requests": n}})
        reqs, _ = build_requests(sc)
        for policy in ("fcfs", "qlm"):
            live_file = args.live / load / policy / "summary.json"
            if not live_file.exists():
                continue
            live = json.loads(live_file.read_text())
            sim = simulate(sc, policy, reqs).summary
            for label, key in METRICS:
                lv, sv = live.get(key), sim.get(key)
                if lv is None or sv is None:
                    continue
                err = (sv - lv) / lv if lv else 0.0
                if key != "slo_attainment":
                    worst[label] = max(worst.get(label, 0.0), abs(err))
                fmt = (lambda x: f"{x:.1%}") if key == "slo_attainment" else (lambda x: f"{x:,.1f}")
                lines.append(f"| {load} ({rate} req/s) | {policy} | {label} | {fmt(lv)} | {fmt(sv)} | {err:+.0%} |")
    lines += ["", "Where the TTFT goes (means, ms). Client: the replay client's TTFT through `qlmctl serve`; vLLM: "
              "the engine's own histograms over the run (API server arrival to first token; engine-core queue + "
              "prefill); simulated: the whole client TTFT and its engine part (frontend delay and API server queue "
              "left out).", "",
              "| load | policy | client | vLLM TTFT | vLLM queue + prefill | simulated | simulated engine part |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for load, (rate, n) in LOADS.items():
        sc = load_scenario(args.scenario, {"workload": {"target_rate_rps": rate, "max_requests": n}})
        reqs, _ = build_requests(sc)
        # The same cluster with the frontend delay removed: what the engine alone takes.
        insts = [dict(i.model_dump(), profile_overrides={**i.profile_overrides, "frontend_latency_s": 0.0,
                                                         "frontend_per_stream_s": 0.0,
                                                         "frontend_queue_factor": 0.0})
                 for i in sc.spec.cluster.instances]
        bare = load_scenario(args.scenario, {"workload": {"target_rate_rps": rate, "max_requests": n},
                                             "cluster": {"instances": insts}})
        for policy in ("fcfs", "qlm"):
            live_file = args.live / load / policy / "summary.json"
            if not live_file.exists():
                continue
            live = json.loads(live_file.read_text())
            em = next(iter(live.get("engine_metrics", {}).values()), {})

            def mean_ms(key: str) -> float | None:
                v = em.get(key)
                return v["mean"] * 1e3 if isinstance(v, dict) and v.get("mean") is not None else None

            q, pf = mean_ms("vllm:request_queue_time_seconds"), mean_ms("vllm:request_prefill_time_seconds")
            sim = simulate(sc, policy, reqs).summary
            engine_only = simulate(bare, policy, reqs).summary
            cells = [live.get("mean_ttft_ms"), mean_ms("vllm:time_to_first_token_seconds"),
                     q + pf if q is not None and pf is not None else None, sim.get("mean_ttft_ms"),
                     engine_only.get("mean_ttft_ms")]
            lines.append(f"| {load} ({rate} req/s) | {policy} | " + " | ".join(
                "-" if c is None else f"{c:,.1f}" for c in cells) + " |")
    table = "\n".join(lines)
    print(table)
    print("\nworst |error| per latency metric:", {k: f"{v:.0%}" for k, v in worst.items()})
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
