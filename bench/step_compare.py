"""The engine core's own steps in a traced replay against the simulated engine's, by tokens per step.

    python bench/step_compare.py DIR --scenario scenarios/fidelity_unseen.yaml --rate 21.5 -n 540 --profile P

DIR is a traced replay's folder (`bench/device/trace_lease.sh` STAGE=4: `reqtrace.jsonl.steps` beside `direct/`). The
step log holds each batch the engine core scheduled (its tokens and requests) and the time it took each batch's
result in; with asynchronous scheduling the core waits on that result, so the gap between results taken in is the
GPU's step. The simulation replays the same requests (the API-server model off: engine steps only). Printed per
bucket of tokens per step: the steps live and simulated, and their mean duration (ms). Then the wait from a
request's arrival stamp to the end of the step in flight, live (to its QUEUED stamp) and simulated."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import simulator.engine as engine_mod  # noqa: E402
from qlmctl.metrics import requests_frame  # noqa: E402
from qlmctl.runner import simulate  # noqa: E402
from qlmctl.scenario import load_scenario  # noqa: E402
from qlmctl.workload import build_requests  # noqa: E402

EDGES = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
ENGINE_ONLY = {"frontend_latency_s": 0.0, "frontend_per_stream_s": 0.0, "frontend_queue_factor": 0.0,
               "enable_prefix_caching": False}


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        path = Path(str(path) + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def live_steps(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, duration s, end time) of each live step: batches paired scheduled-to-result in order, each one's
    duration the gap from the result before it (the first result of a busy spell has none and is left out)."""
    recs = _lines(folder / "reqtrace.jsonl.steps")
    pending: list[dict] = []
    toks, durs, ends = [], [], []
    last = None
    for r in recs:
        if r["k"] == "s":
            if r["tok"] > 0:
                pending.append(r)
            continue
        if r["tok"] <= 0 or not pending:
            continue
        s = pending.pop(0)
        start = max(s["t"], last) if last is not None else None
        if start is not None and r["t"] - start < 1.0:  # an idle engine between them: no step duration
            toks.append(s["tok"])
            durs.append(r["t"] - start)
            ends.append(r["t"])
        last = r["t"]  # the GPU finished that batch: the next one, queued behind it, runs from here
    return np.array(toks), np.array(durs), np.array(ends)


def simulated_steps(sc, reqs) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """(tokens, duration s, end time) of each simulated step, and the run."""
    segs = []
    orig = engine_mod.Engine._plan

    def plan(self, t, *args, **kwargs):
        out = orig(self, t, *args, **kwargs)
        seg = self._seg
        if seg is not None and (not segs or segs[-1][0] is not seg):
            segs.append((seg, self.profile))
        return out

    engine_mod.Engine._plan = plan
    try:
        run = simulate(sc, "direct", reqs)
    finally:
        engine_mod.Engine._plan = orig
    toks, durs, ends = [], [], []
    for seg, p in segs:
        t, d = seg.t0, seg.fixed + p.per_context_token_s * seg.ctx0
        for _ in range(seg.n):
            toks.append(seg.prefill + seg.decode)
            durs.append(d)
            t += d
            ends.append(t)
            d += p.per_context_token_s * seg.decode
    return np.array(toks), np.array(durs), np.array(ends), run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--scenario", type=Path, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--profile", type=Path, required=True)
    args = ap.parse_args()
    models = load_scenario(args.scenario).spec.models
    over = {"workload": {"target_rate_rps": args.rate, "max_requests": args.n},
            "models": {m: {"profile_file": str(args.profile.resolve())} for m in models}}
    base = load_scenario(args.scenario, over)
    insts = []
    for i in base.spec.cluster.instances:
        d = i.model_dump()
        d["profile_overrides"] = {**i.profile_overrides, **ENGINE_ONLY}
        insts.append(d)
    sc = load_scenario(args.scenario, {**over, "cluster": {**base.spec.cluster.model_dump(), "instances": insts}})
    reqs, _ = build_requests(sc)
    lt, ld, _ = live_steps(args.folder)
    st, sd, se, run = simulated_steps(sc, reqs)
    print("| tokens per step | live steps | simulated steps | live mean (ms) | simulated mean (ms) | difference |")
    print("|---|---:|---:|---:|---:|---:|")
    lo = 0
    for e in EDGES:
        lm, sm = (lt > lo) & (lt <= e), (st > lo) & (st <= e)
        if lm.any() or sm.any():
            a = ld[lm].mean() * 1e3 if lm.any() else float("nan")
            b = sd[sm].mean() * 1e3 if sm.any() else float("nan")
            print(f"| {lo + 1}-{e} | {lm.sum()} | {sm.sum()} | {a:.1f} | {b:.1f} | {b / a - 1:+.0%} |")
        lo = e
    print(f"| all | {len(lt)} | {len(st)} | {ld.mean() * 1e3:.1f} | {sd.mean() * 1e3:.1f} | "
          f"{sd.mean() / ld.mean() - 1:+.0%} |")
    # The wait for the step in flight: live, arrival stamp to QUEUED; simulated, arrival to that step's end.
    trace = _lines(args.folder / "reqtrace.jsonl")
    intake = np.array([r["queued"] - (r["arrival_wall"] - r["wall_minus_mono"]) for r in trace])
    frame = requests_frame(run.result.requests)
    arr = frame["arrival_s"].to_numpy()
    k = np.minimum(np.searchsorted(se, arr, side="right"), len(se) - 1)
    print(f"\nwait for the step in flight, mean (ms): live {intake.mean() * 1e3:.1f} (arrival stamp to QUEUED), "
          f"simulated {(se[k] - arr).mean() * 1e3:.1f}")


if __name__ == "__main__":
    main()
