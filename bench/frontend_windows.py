"""profile-model's API-server load windows, simulated with a profile, against what was measured.

    python bench/frontend_windows.py docs/fidelity/lease-h100-d/raw-lease.json \
        --profile docs/fidelity/lease-h100-d/h100-lease.yaml
    python bench/frontend_windows.py docs/fidelity/api-split-h100/api1.json --profile P [--set frontend_window_s=1]

`profile-model` fits the API-server queue model (`EngineProfile.frontend_wait`) on these windows with the engine's
part taken from vLLM's histograms plus half a step and the load at the window's mean rates; the simulator instead
runs the engine step by step and charges the wait at the load it sees (the step in flight, or a window:
`frontend_window_s`). This replays each stream count's windows in the simulator as profile-model ran them (the
same streams, 512-token prompts decoding throughout and ageing from window to window, Poisson probes of 1,024
tokens at each window's rate asking for its probes' answer, `--load-probes`; mean over seeds): the check the fit does not make. Columns: the
probes' mean client TTFT live and simulated, the simulated engine part (the same run with the API-server model off)
against vLLM's queue + prefill, and the split of the live remainder (vLLM's TTFT beyond its queue + prefill; the
client's beyond vLLM's TTFT). Reads a raw profile (`frontend_load`) or a list of windows
(`bench/device/api_split.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from fidelity_compare import ENGINE_ONLY  # bench/, this script's folder, is on the path

from qlmctl.core.request import Request
from qlmctl.runner import simulate
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.engine import Engine, Sequence
from simulator.fit import queue_ran_away

MODEL = "llama-3.1-8b"
SCRAPE_S = 0.15
"""Time between two windows of profile-model's (the probes' last responses, two /metrics scrapes), s."""


def scenario(profile: Path, overrides: dict) -> Scenario:
    spec = {
        "name": "frontend-windows",
        "models": {MODEL: {"profile_file": str(profile.resolve())}},
        "cluster": {"instances": [{"name": "gpu0", "model": MODEL, "engine": {"enable_prefix_caching": False},
                                   "profile_overrides": {"max_num_seqs": 1024, **overrides}}]},
        "slo_classes": {"batch": {"ttft_s": 3600}},
        "workload": {"synthetic": {"rate_rps": 1, "num_requests": 1}},
    }
    return Scenario(ScenarioSpec.model_validate(spec), Path(__file__))


def probe_times(rng: np.random.Generator, start: float, end: float, rate: float) -> list[float]:
    """Poisson arrival times at `rate` per second in [`start`, `end`), as profile-model sends its probes."""
    times = []
    t = start + rng.exponential(1.0 / rate)
    while t < end:
        times.append(t)
        t += rng.exponential(1.0 / rate)
    return times


def streams_prefilled(sc: Scenario, streams: int) -> tuple[Engine, float]:
    """The simulated engine alone with `streams` 512-token prompts sent at once (1 ms apart), advanced to when all
    are prefilled (within 10 ms), and that time, s."""
    eng = Engine(sc.profile(MODEL, overrides={"max_num_seqs": 1024}))
    for i in range(streams):
        eng.submit(Sequence(i, 512, 4000, arrival_s=0.001 * i), 0.001 * i)
    t = 0.001 * streams
    while eng.pending_prefill_tokens or eng.num_waiting:
        t += 0.01
        eng.advance(t)
    return eng, t


def window_ttft(sc: Scenario, streams: int, windows: list[tuple[float, float, float, int, int]],
                seed: int) -> list[float]:
    """Mean simulated client TTFT of the probes of each of a run of windows beside the same `streams`, s:
    `windows` are (start s after the streams are prefilled and half a second more, length s, probes per second,
    probe tokens, tokens each probe asks for). One simulation for the run: the streams age through it."""
    rng = np.random.default_rng(seed)
    reqs = [Request(i, 0.001 * i, MODEL, "batch", 3600.0, 512, 4000) for i in range(streams)]
    t0 = streams_prefilled(sc, streams)[1] + 0.5
    runs: list[list[Request]] = []
    k = streams
    for start, length, rate, tokens, outs in windows:
        probes = []
        for t in probe_times(rng, t0 + start, t0 + start + length, rate):
            probes.append(Request(k, t, MODEL, "batch", 3600.0, tokens, outs))
            k += 1
        runs.append(probes)
    simulate(sc, "direct", reqs + [r for probes in runs for r in probes], copy_requests=False)
    return [float(np.mean([r.first_token_s - r.arrival_s for r in probes])) if probes else float("nan")
            for probes in runs]


def window_steps(sc: Scenario, streams: int, windows: list[tuple[float, float, float, int, int]],
                 seed: int) -> list[tuple[float, float]]:
    """(steps per second, mean step s) of the simulated engine alone over each of a run of windows beside the same
    `streams` (512-token prompts decoding throughout, as profile-model's load): `windows` are (start s after the
    streams are prefilled, length s, probes per second, probe tokens, probe output tokens), the probes sent
    straight to the engine. The streams age from window to window as they do live (their contexts grow, and each
    step's attention with them), so a run of windows is simulated as one. For the window's steps against vLLM's
    (its iteration-token histogram, or the streams' inter-token latency)."""
    rng = np.random.default_rng(seed)
    eng, t0 = streams_prefilled(sc, streams)
    t0 += 0.5  # profile-model waits half a second once the streams are prefilled
    k = streams
    out = []
    for start, length, rate, tokens, outs in windows:
        a, b = t0 + start, t0 + start + length
        eng.advance(a)
        _, steps0 = eng.streamed(a)
        for t in probe_times(rng, a, b, rate):
            eng.advance(t)
            eng.submit(Sequence(k, tokens, outs, arrival_s=t), t)
            k += 1
        eng.advance(b)
        steps = eng.streamed(b)[1] - steps0
        out.append((steps / length, length / steps if steps else float("nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", type=Path, help="a raw profile (profile-model --raw) or bench/device/api_split.py's JSON")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a profile field, repeatable")
    ap.add_argument("--window-s", type=float, default=4.0, help="each window's length, s (profile-model's)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    data = json.loads(args.raw.read_text())
    windows = data["frontend_load"] if isinstance(data, dict) else data
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    sc = scenario(args.profile, overrides)
    bare = scenario(args.profile, {**overrides, **ENGINE_ONLY})
    print("| probes | streams | req/s | live client (ms) | simulated (ms) | error | simulated engine part (ms) "
          "| vLLM queue + prefill (ms) | live: vLLM TTFT beyond it (ms) | live: client beyond vLLM TTFT (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    errs = []
    by_streams: dict[int, list[dict]] = {}  # profile-model measures a stream count's windows in a row
    for w in windows:
        by_streams.setdefault(w["streams"], []).append(w)
    for ws in by_streams.values():
        # Where it was not recorded, each window is taken to start a window and a scrape after the one before
        # (a window whose probes stream answers ends when the last is answered: about its answer's steps later).
        spec, start = [], 0.0
        lengths = [w.get("window_s") or args.window_s for w in ws]  # recorded, else --window-s
        for w, length in zip(ws, lengths):
            outs = w.get("probe_out", 1)
            spec.append((start, length, w["rate_rps"], w["probe_tokens"], outs))
            start += length + SCRAPE_S + (outs - 1) * w.get("step_s", 0.0)
        sims, engines = ([window_ttft(s, ws[0]["streams"], spec, k) for k in range(args.seeds)] for s in (sc, bare))
        for j, w in enumerate(ws):
            sim, engine = float(np.mean([x[j] for x in sims])), float(np.mean([x[j] for x in engines]))
            live = w["client_ttft_s"]
            err = sim / live - 1.0
            # A window whose queue ran away (answered over twice its length, or the API server's CPU at one core)
            # measures the window: listed, not counted (profile-model's fit leaves it out too).
            away = queue_ran_away(w["probes"], w["rate_rps"], lengths[j], w.get("cpu_per_s"))
            if not away:
                errs.append(abs(err))
            qp, vt = w.get("engine_s"), w.get("vllm_ttft_s")
            cells = [f"{x * 1e3:.1f}" if x is not None else "-" for x in
                     (qp, vt - qp if vt is not None and qp is not None else None, live - vt if vt is not None else None)]
            kind = f"{'words' if w.get('probe_words') else 'ids'}:{w.get('probe_out', 1)}"
            print(f"| {kind} | {w['streams']} | {w['rate_rps']:.1f} | {live * 1e3:.1f} | {sim * 1e3:.1f} | "
                  f"{'ran away, not counted' if away else f'{err:+.0%}'} "
                  f"| {engine * 1e3:.1f} | " + " | ".join(cells) + " |")
    left = len(windows) - len(errs)
    print(f"\nmean |error| {np.mean(errs):.1%}, worst {max(errs):.1%} over {len(errs)} windows"
          + (f" ({left} whose queue ran away not counted)" if left else ""))


if __name__ == "__main__":
    main()
