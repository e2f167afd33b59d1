"""Compare live replays (real vLLM through `qlmctl serve`, or straight to it) with `qlmctl simulate` on the same
workload.

    python bench/fidelity_compare.py LIVE_DIR [--out docs/fidelity.md]
    python bench/fidelity_compare.py LIVE_DIR --scenario S --loads light:10.8:216,near:21.5:540 \
        --policies direct,direct@priority,fcfs [--set frontend_window_s=1] [--step-scale 1.02]

A policy `P@priority` is the live folder `P-priority` (bench/device/replay_direct.py --priority writes
`direct-priority`), simulated as P with the engines' --scheduling-policy priority. Where the live engine reports
its prefix cache (vLLM's prefix_cache_queries/hits counters), the table adds the hit rates, and the simulated
TTFT with prefix caching off for scale.

LIVE_DIR holds one folder per load run (light, near, over; repetitions of a load as near_b, near_c, ...), each
with one results folder per policy, as bench/device/fidelity_h200.sh writes them. Live numbers are means over
the repetitions. The simulated side replays the same scenario, trace, rate, request count and seed with the
measured profile, once per load and policy (it is deterministic), or with `--ensemble K` K times with the sends
jittered by up to `--jitter-ms`, compared by the K runs' mean (near saturation one run is as chaotic as a live one).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from statistics import mean

import pandas as pd
import yaml

from qlmctl.metrics import requests_frame
from qlmctl.runner import fresh_copies, simulate
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
TARGET_CELLS = {f"{m} p{q} (ms)" for m in ("TTFT", "TPOT", "E2EL") for q in (50, 90)}
"""The cells issue 18's targets count."""


STEP_FIELDS = ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s", "per_prefill_pair_s",
               "per_prefill_step_s")
"""The step-time model's coefficients (`EngineProfile.step_time`): what `--step-scale` multiplies."""

ENGINE_ONLY = {"frontend_latency_s": 0.0, "frontend_per_stream_s": 0.0, "frontend_queue_factor": 0.0}
"""Profile overrides that take the API server's delays out: what the engine alone takes."""


def replay_scenario(path: Path, over: dict, discipline: str | None = None, *, profile: Path | None = None,
                    extra: dict | None = None, step_scale: float = 1.0, **fields: object):
    """The scenario at `path` with `over` applied, as a live replay ran it: every model on `profile` (when given),
    each instance's profile overridden by `extra` (`--set`), its step coefficients times `step_scale`, then by
    `fields`; its engines with `--scheduling-policy discipline` (when given)."""
    extra = extra or {}
    if profile is not None:
        models = load_scenario(path).spec.models
        over = {**over, "models": {m: {"profile_file": str(profile.resolve())} for m in models}}
    base = load_scenario(path, over)
    insts = []
    for i in base.spec.cluster.instances:
        d = i.model_dump()
        scaled = {}
        if step_scale != 1.0 and i.model is not None:
            prof = base.profile(i.model, i.gpu, {**i.profile_overrides, **extra}, i.engine)
            scaled = {f: getattr(prof, f) * step_scale for f in STEP_FIELDS}
        d["profile_overrides"] = {**i.profile_overrides, **extra, **scaled, **fields}
        if discipline:
            d["engine"] = {**(d.get("engine") or {}), "scheduling_policy": discipline}
        insts.append(d)
    return load_scenario(path, {**over, "cluster": {**base.spec.cluster.model_dump(), "instances": insts}})


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


def live_steps(summary: dict) -> float | None:
    """Engine steps over a live run: the count of vLLM's `iteration_tokens_total` histogram (one sample a step),
    summed over the engines."""
    counts = [m["vllm:iteration_tokens_total"]["count"] for m in summary.get("engine_metrics", {}).values()
              if isinstance(m.get("vllm:iteration_tokens_total"), dict)]
    return float(sum(counts)) if counts else None


def prefix_hit_rate(summary: dict) -> float | None:
    """vLLM's prefix-cache hit rate over a live run (its counters' deltas), None when it reports none."""
    em = next(iter(summary.get("engine_metrics", {}).values()), {})
    q, h = em.get("vllm:prefix_cache_queries"), em.get("vllm:prefix_cache_hits")
    return h / q if isinstance(q, (int, float)) and isinstance(h, (int, float)) and q > 0 else None


def jittered(requests: list, k: int, jitter_s: float) -> list:
    """Replay `k` of an ensemble: copies of `requests` sent each up to `jitter_s` earlier or later (uniform, seeded by
    `k`); replay 0 is `requests` themselves. Near saturation one simulated replay is as chaotic as a live one (a
    cost 0.5 % higher moved the conversation's TTFT p50 by -9 % to +15 %), so a cell compares means of both."""
    if k == 0 or jitter_s <= 0:
        return requests
    rng = random.Random(k)
    out = fresh_copies(requests)
    for r in out:
        r.arrival_s = max(0.0, r.arrival_s + rng.uniform(-jitter_s, jitter_s))
    return out


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
    ap.add_argument("--profile", type=Path, default=None,
                    help="a profile file for every model of the scenario (e.g. one measured on the live runs' GPU)")
    ap.add_argument("--step-scale", type=float, default=1.0, metavar="F",
                    help="multiply the simulated engine's step-time coefficients by F (a sensitivity check: how "
                         "much a latency moves per percent of engine speed)")
    ap.add_argument("--loads", default=None, metavar="NAME:RATE:N,...",
                    help="the loads (default: light:8:240,near:20:600,over:32:960)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="live folders to compare (P@priority: see above)")
    ap.add_argument("--ensemble", type=int, default=1, metavar="K",
                    help="simulate each replay K times, the sends jittered by up to --jitter-ms (the first as sent), "
                         "and compare the K runs' mean (default 1: one run)")
    ap.add_argument("--jitter-ms", type=float, default=2.0, metavar="MS",
                    help="how far an ensemble's replays move each send, ms (default 2: the spread of a four-process "
                         "client's writes, docs/fidelity.md)")
    args = ap.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if args.api_servers != 1:
        extra["api_server_count"] = args.api_servers
    loads = LOADS
    if args.loads:
        loads = {name: (float(rate), int(n)) for name, rate, n in (x.split(":") for x in args.loads.split(","))}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]

    runs = {load: repetitions(args.live, load) for load in loads}
    lines = ["Live repetitions per load: " + ", ".join(f"{load} {len(r)}" for load, r in runs.items()), "",
             "| load | policy | metric | live | simulated | error | live spread |",
             "|---|---|---|---:|---:|---:|---:|"]
    breakdown = ["", "Where the TTFT goes (means, ms; live columns averaged over repetitions). Client: the replay "
                 "client's TTFT through `qlmctl serve`; vLLM: the engine's own histograms over the run (API server "
                 "arrival to first token; engine-core queue + prefill); simulated: the whole client TTFT and its "
                 "engine part (frontend delay and API server queue left out). Steps: the engine steps of the run, live "
                 "(vLLM's iteration histogram) and simulated, which tell whether the batches were composed alike.", "",
                 "| load | policy | client | vLLM TTFT | vLLM queue + prefill | simulated | simulated engine part "
                 "| live steps | simulated steps |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    caching = ["", "Prefix cache (share of the admitted prompt tokens found cached; live: vLLM's counters):", "",
               "| load | policy | live hit rate | simulated hit rate | live TTFT p50 | simulated "
               "| simulated, caching off |",
               "|---|---|---:|---:|---:|---:|---:|"]
    worst: dict[str, float] = {}
    target_errors: list[float] = []

    def scenario_for(over: dict, discipline: str | None, **fields: object) -> object:
        return replay_scenario(args.scenario, over, discipline, profile=args.profile, extra=extra,
                               step_scale=args.step_scale, **fields)

    for load, (rate, n) in loads.items():
        over: dict = {"workload": {"target_rate_rps": rate, "max_requests": n}}
        for spec in policies:
            policy, _, discipline = spec.partition("@")
            folder_name = f"{policy}-{discipline}" if discipline else policy
            folders = [d / folder_name for d in runs[load] if (d / folder_name / "summary.json").exists()]
            if not folders:
                continue
            sc = scenario_for(over, discipline or None)
            reqs, _ = build_requests(sc)
            bare = scenario_for(over, discipline or None, **ENGINE_ONLY)
            live_vals, live_cells = [], []
            for f in folders:
                summary = json.loads((f / "summary.json").read_text())
                frame = pd.read_parquet(f / "requests.parquet") if (f / "requests.parquet").exists() else None
                live_vals.append(metric_values(summary, frame))
                live_cells.append(engine_cells(summary) + [live_steps(summary)])
            ensemble = [simulate(sc, policy, jittered(reqs, k, args.jitter_ms / 1e3)) for k in range(max(1, args.ensemble))]
            run = ensemble[0]
            sims = [metric_values(r.summary, requests_frame(r.result.requests)) for r in ensemble]
            name = f"{load} ({rate:g} req/s)"
            for label, key in METRICS:
                lvs = [v[label] for v in live_vals if v[label] is not None]
                svs = [v[label] for v in sims if v[label] is not None]
                if not lvs or not svs:
                    continue
                sv = mean(svs)
                lv = mean(lvs)
                err = (sv - lv) / lv if lv else 0.0
                if key != "slo_attainment":
                    worst[label] = max(worst.get(label, 0.0), abs(err))
                if label in TARGET_CELLS:
                    target_errors.append(abs(err))
                fmt = (lambda x: f"{x:.1%}") if key == "slo_attainment" else (lambda x: f"{x:,.1f}")
                live_txt = fmt(lv) + (f" ({fmt(min(lvs))}-{fmt(max(lvs))})" if len(lvs) > 1 else "")
                spread = f"{(max(lvs) - min(lvs)) / lv:.0%}" if len(lvs) > 1 and lv else "-"
                sim_txt = fmt(sv) + (f" ({fmt(min(svs))}-{fmt(max(svs))})" if len(svs) > 1 else "")
                lines.append(f"| {name} | {spec} | {label} | {live_txt} | {sim_txt} | {err:+.0%} | {spread} |")
            cells = [mean_or_none([c[i] for c in live_cells]) for i in range(3)]
            cells += [run.summary.get("mean_ttft_ms"), simulate(bare, policy, reqs).summary.get("mean_ttft_ms")]
            cells += [mean_or_none([c[3] for c in live_cells]), float(sum(i["steps"] for i in run.result.instances))]
            breakdown.append(f"| {name} | {spec} | " + " | ".join(
                "-" if c is None else f"{c:,.0f}" if i >= 5 else f"{c:,.1f}" for i, c in enumerate(cells)) + " |")
            live_hits = [prefix_hit_rate(json.loads((f / "summary.json").read_text())) for f in folders]
            live_hits = [h for h in live_hits if h is not None]
            if live_hits:
                sim_hit = (run.summary.get("instances") or {}).get("0", {}).get("prefix_cache_hit_rate")
                no_cache = scenario_for(over, discipline or None, enable_prefix_caching=False)
                off = simulate(no_cache, policy, reqs).summary
                lv = mean_or_none([v["TTFT p50 (ms)"] for v in live_vals])
                caching.append(f"| {name} | {spec} | {mean(live_hits):.1%} | "
                               f"{'-' if sim_hit is None else f'{sim_hit:.1%}'} | "
                               f"{'-' if lv is None else f'{lv:,.1f}'} | {run.summary['p50_ttft_ms']:,.1f} | "
                               f"{off['p50_ttft_ms']:,.1f} |")
    table = "\n".join(lines + breakdown + (caching if len(caching) > 5 else []))
    print(table)
    print("\nworst |error| per latency metric:", {k: f"{v:.0%}" for k, v in worst.items()})
    if target_errors:  # the targets: every TTFT / TPOT / E2EL p50 and p90 within 10 %, then 5 %
        n = len(target_errors)
        print(f"TTFT / TPOT / E2EL p50 and p90 cells: {n}; within 10 %: {sum(e <= 0.10 for e in target_errors)}, "
              f"within 5 %: {sum(e <= 0.05 for e in target_errors)}")
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
