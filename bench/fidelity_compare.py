"""Compare live replays (real vLLM through `qlmctl serve`) with `qlmctl simulate` on the same workload.

    python bench/fidelity_compare.py LIVE_DIR [--out docs/fidelity.md]

LIVE_DIR holds one folder per load run (light, near, over; repetitions of a load as near_b, near_c, ...), each
with one results folder per policy, as bench/device/fidelity_h200.sh writes them. Live numbers are means over
the repetitions. The simulated side replays the same scenario, trace, rate, request count and seed with the
measured profile (once per load and policy: it is deterministic).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from statistics import mean

import pandas as pd
import yaml

from qlmctl.metrics import requests_frame
from qlmctl.runner import simulate
from qlmctl.scenario import load_scenario
from qlmctl.workload import build_requests

REPO = Path(__file__).resolve().parents[1]
LOADS = {"light": (8, 240), "near": (20, 600), "over": (32, 960)}
POLICIES = ("fcfs", "qlm")
# Keys "class:<slo_class>" are the per-class TTFT p50 from the requests frame; the rest come from summary.json.
METRICS = [("TTFT p50 (ms)", "p50_ttft_ms"), ("TTFT p90 (ms)", "p90_ttft_ms"),
           ("TTFT p50 interactive (ms)", "class:interactive"), ("TTFT p50 batch (ms)", "class:batch"),
           ("TPOT p50 (ms)", "p50_tpot_ms"), ("TPOT p90 (ms)", "p90_tpot_ms"), ("E2EL p50 (ms)", "p50_e2el_ms"),
           ("E2EL p90 (ms)", "p90_e2el_ms"), ("throughput (req/s)", "request_throughput"),
           ("SLO attainment", "slo_attainment")]


def repetitions(live: Path, load: str) -> list[Path]:
    """The load's run folders: `load` itself and `load_b`, `load_c`, ... (not e.g. `near_inproc`)."""
    return sorted(d for d in live.iterdir() if d.is_dir() and re.fullmatch(rf"{load}(_[a-z])?", d.name))


def class_ttft_p50_ms(frame: pd.DataFrame | None, slo_class: str) -> float | None:
    if frame is None:
        return None
    ok = frame[(frame["slo_class"] == slo_class) & frame["error"].isna() & frame["ttft_s"].notna()]
    return float(ok["ttft_s"].median()) * 1e3 if len(ok) else None


def metric_values(summary: dict, frame: pd.DataFrame | None) -> dict[str, float | None]:
    return {label: class_ttft_p50_ms(frame, key.removeprefix("class:")) if key.startswith("class:")
            else summary.get(key) for label, key in METRICS}


def engine_cells(summary: dict) -> list[float | None]:
    """Live TTFT breakdown: client mean, vLLM's own TTFT mean, vLLM queue + prefill mean (ms)."""
    em = next(iter(summary.get("engine_metrics", {}).values()), {})

    def mean_ms(key: str) -> float | None:
        v = em.get(key)
        return v["mean"] * 1e3 if isinstance(v, dict) and v.get("mean") is not None else None

    q, pf = mean_ms("vllm:request_queue_time_seconds"), mean_ms("vllm:request_prefill_time_seconds")
    return [summary.get("mean_ttft_ms"), mean_ms("vllm:time_to_first_token_seconds"),
            q + pf if q is not None and pf is not None else None]


def mean_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return mean(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("live", type=Path)
    ap.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "fidelity_h200.yaml")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--api-servers", type=int, default=1,
                    help="vLLM's --api-server-count in the live runs (the simulated profile takes it too)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a profile field for the simulated side, e.g. frontend_window_s=1 (repeatable)")
    args = ap.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if args.api_servers != 1:
        extra["api_server_count"] = args.api_servers

    runs = {load: repetitions(args.live, load) for load in LOADS}
    lines = ["Live repetitions per load: " + ", ".join(f"{load} {len(r)}" for load, r in runs.items()), "",
             "| load | policy | metric | live | simulated | error | live spread |",
             "|---|---|---|---:|---:|---:|---:|"]
    breakdown = ["", "Where the TTFT goes (means, ms; live columns averaged over repetitions). Client: the replay "
                 "client's TTFT through `qlmctl serve`; vLLM: the engine's own histograms over the run (API server "
                 "arrival to first token; engine-core queue + prefill); simulated: the whole client TTFT and its "
                 "engine part (frontend delay and API server queue left out).", "",
                 "| load | policy | client | vLLM TTFT | vLLM queue + prefill | simulated | simulated engine part |",
                 "|---|---|---:|---:|---:|---:|---:|"]
    worst: dict[str, float] = {}
    for load, (rate, n) in LOADS.items():
        over: dict = {"workload": {"target_rate_rps": rate, "max_requests": n}}
        if extra:
            base = load_scenario(args.scenario, over)
            over["cluster"] = {"instances": [
                dict(i.model_dump(), profile_overrides={**i.profile_overrides, **extra})
                for i in base.spec.cluster.instances]}
        sc = load_scenario(args.scenario, over)
        reqs, _ = build_requests(sc)
        # The same cluster with the frontend delay removed: what the engine alone takes.
        insts = [dict(i.model_dump(), profile_overrides={**i.profile_overrides, "frontend_latency_s": 0.0,
                                                         "frontend_per_stream_s": 0.0,
                                                         "frontend_queue_factor": 0.0})
                 for i in sc.spec.cluster.instances]
        bare = load_scenario(args.scenario, {**over, "cluster": {"instances": insts}})
        for policy in POLICIES:
            folders = [d / policy for d in runs[load] if (d / policy / "summary.json").exists()]
            if not folders:
                continue
            live_vals, live_cells = [], []
            for f in folders:
                summary = json.loads((f / "summary.json").read_text())
                frame = pd.read_parquet(f / "requests.parquet") if (f / "requests.parquet").exists() else None
                live_vals.append(metric_values(summary, frame))
                live_cells.append(engine_cells(summary))
            run = simulate(sc, policy, reqs)
            sim = metric_values(run.summary, requests_frame(run.result.requests))
            name = f"{load} ({rate} req/s)"
            for label, key in METRICS:
                lvs = [v[label] for v in live_vals if v[label] is not None]
                sv = sim[label]
                if not lvs or sv is None:
                    continue
                lv = mean(lvs)
                err = (sv - lv) / lv if lv else 0.0
                if key != "slo_attainment":
                    worst[label] = max(worst.get(label, 0.0), abs(err))
                fmt = (lambda x: f"{x:.1%}") if key == "slo_attainment" else (lambda x: f"{x:,.1f}")
                live_txt = fmt(lv) + (f" ({fmt(min(lvs))}-{fmt(max(lvs))})" if len(lvs) > 1 else "")
                spread = f"{(max(lvs) - min(lvs)) / lv:.0%}" if len(lvs) > 1 and lv else "-"
                lines.append(f"| {name} | {policy} | {label} | {live_txt} | {fmt(sv)} | {err:+.0%} | {spread} |")
            cells = [mean_or_none([c[i] for c in live_cells]) for i in range(3)]
            cells += [run.summary.get("mean_ttft_ms"), simulate(bare, policy, reqs).summary.get("mean_ttft_ms")]
            breakdown.append(f"| {name} | {policy} | " + " | ".join(
                "-" if c is None else f"{c:,.1f}" for c in cells) + " |")
    table = "\n".join(lines + breakdown)
    print(table)
    print("\nworst |error| per latency metric:", {k: f"{v:.0%}" for k, v in worst.items()})
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
