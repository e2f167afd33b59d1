"""The engine core's own steps in a traced replay against the simulated engine's, by tokens per step.

    python bench/step_compare.py DIR --scenario scenarios/fidelity_unseen.yaml --rate 21.5 -n 540 --profile P

DIR is a traced replay's folder (`bench/device/trace_lease.sh` STAGE=4: `reqtrace.jsonl.steps` beside `direct/`). The
step log holds each batch the engine core scheduled (its tokens and requests) and the time it took each batch's
result in; with asynchronous scheduling the core waits on that result, so the gap between results taken in is the
GPU's step. The simulation replays the same requests (the API-server model off: engine steps only). Printed per
bucket of tokens per step: the steps live and simulated, and their mean duration (ms). Then the wait from a
request's arrival stamp to the end of the step in flight, live (to its QUEUED stamp) and simulated. Then, per
request, where its way from the engine's door to its first token goes (`per_request_split`): the rest of the step
in flight, the step already scheduled when it was taken in, and its own step, with their tokens, and how many
first tokens each step that carried one carried (more per step: fewer, longer prefill steps).

    --live-door: simulate the engine with each request arriving when the live API server handed it to the engine
    (its `add_request`), not when the client sent it, and compare the engine's TTFT from that moment: what the
    engine model gives when the API server's timing is taken from the live run."""

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


def live_steps(recs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, duration s, end time) of each live step: batches paired scheduled-to-result in order, each one's
    duration the gap from the result before it (the first result of a busy spell has none and is left out)."""
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


def first_token_steps(ends: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Index, in the sorted simulated step ends, of the step that gave each first token."""
    return np.clip(np.searchsorted(ends, first - 1e-6), 1, len(ends) - 1)


def per_step(label: str, idx: np.ndarray) -> str:
    """How many first tokens each step that gave one gave, from each request's step index."""
    _, c = np.unique(idx, return_counts=True)
    return (f"{label}: {len(c)} steps carried a first token, {c.mean():.2f} each "
            f"(1, 2, 3, 4+: {np.sum(c == 1)}, {np.sum(c == 2)}, {np.sum(c == 3)}, {np.sum(c >= 4)})")


def per_request_split(recs: list[dict], trace: list[dict], run, st: np.ndarray, sd: np.ndarray,
                      se: np.ndarray) -> None:
    """Print the split of each request's time from the engine's door to its first token, live and simulated.

    Live: from `add_request` to QUEUED (the core takes new requests in as it takes a result in), the steps whose
    results came between QUEUED and the first token's result save the last (the one already scheduled, with
    asynchronous scheduling), and the last (its own). Simulated, the engine alone (no API server): from arrival
    to the end of the step in flight, the steps up to the one before the first token, and the first token's."""
    results = [r for r in recs if r["k"] == "u"]
    ut = np.array([r["t"] for r in results])
    done = np.array([r["done"] for r in results])
    utok = np.array([r["tok"] for r in results])
    trace = [r for r in trace if r.get("api")]
    if not trace or len(ut) < 2:
        print("\n(no per-request split: the trace has no API-server records or no steps)")
        return
    add = np.array([r["api"]["add"] for r in trace])
    queued = np.array([r["queued"] for r in trace])
    first = np.array([r["first_token"] for r in trace])
    j = np.maximum(np.searchsorted(done, queued) - 1, 0)  # the result the core had just taken in at QUEUED
    m = np.clip(np.searchsorted(ut, first + 0.003) - 1, 1, len(ut) - 1)  # the result carrying the first token
    dur = np.diff(ut, prepend=ut[0])
    live = {"door": queued - add, "scheduled": ut[m - 1] - ut[j], "own": dur[m], "scheduled_tok": utok[np.minimum(j + 1, m)],
            "own_tok": utok[m], "per_step": m}
    order = np.argsort(se, kind="stable")
    st, sd, se = st[order], sd[order], se[order]
    frame = requests_frame(run.result.requests)
    arr = frame["arrival_s"].to_numpy()
    ft = (frame["arrival_s"] + frame["ttft_s"]).to_numpy()
    k = np.minimum(np.searchsorted(se, arr - 1e-9), len(se) - 1)
    f = first_token_steps(se, ft)
    sim = {"door": se[k] - arr, "scheduled": se[f - 1] - se[k], "own": sd[f], "scheduled_tok": st[np.minimum(k + 1, f)],
           "own_tok": st[f], "per_step": f}
    print("\n| per request (means) | live | simulated |\n|---|---:|---:|")
    rows = [("door to taken in (ms)", "door", 1e3), ("the step already scheduled (ms)", "scheduled", 1e3),
            ("its own step (ms)", "own", 1e3), ("tokens of the step already scheduled", "scheduled_tok", 1),
            ("tokens of its own step", "own_tok", 1)]
    ok_l = live["scheduled"] < 1.0  # an engine idle between them: no step to split
    ok_s = sim["scheduled"] < 1.0
    for label, key, scale in rows:
        print(f"| {label} | {live[key][ok_l].mean() * scale:.1f} | {sim[key][ok_s].mean() * scale:.1f} |")
    print(per_step("live", live["per_step"]))
    print(per_step("simulated", sim["per_step"]))


def door_compare(folder: Path, sc, reqs) -> None:
    """Print the engine's TTFT from the live hand-over (`add_request`), live and simulated with the requests
    arriving then, and the first tokens per prefill step."""
    trace = {int(r["id"].rsplit("-", 2)[1]): r for r in _lines(folder / "reqtrace.jsonl") if r.get("api")}
    keys = [int(str(r.request_id).rsplit("-", 1)[-1]) for r in reqs]
    missing = [k for k in keys if k not in trace]
    if missing:
        raise SystemExit(f"{folder / 'reqtrace.jsonl'}: no API-server record for {len(missing)} requests "
                         f"(first: {missing[0]})")
    door = np.array([trace[k]["api"]["add"] for k in keys])
    sends = np.array([r.arrival_s for r in reqs])
    for label, t in (("client sends", sends), ("hand-overs (add_request)", door)):
        gaps = np.diff(np.sort(t))
        print(f"{label}: {np.mean(gaps < 0.002):.1%} of the gaps between consecutive ones under 2 ms")
    shift = door.min() - min(r.arrival_s for r in reqs)
    for r, t in zip(reqs, door):
        r.arrival_s = float(t - shift)
    reqs.sort(key=lambda r: r.arrival_s)
    _, _, se, run = simulated_steps(sc, reqs)
    frame = requests_frame(run.result.requests)
    sim = frame["ttft_s"].to_numpy()
    live = np.array([trace[k]["first_token"] - trace[k]["api"]["add"] for k in keys])
    print("| engine TTFT from the hand-over (ms) | live | simulated | error |\n|---|---:|---:|---:|")
    for label, f in (("mean", np.mean), ("p50", np.median), ("p90", lambda x: np.percentile(x, 90))):
        a, b = f(live) * 1e3, f(sim) * 1e3
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a - 1:+.0%} |")
    print(per_step("simulated", first_token_steps(np.sort(se), (frame["arrival_s"] + frame["ttft_s"]).to_numpy())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--scenario", type=Path, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--live-door", action="store_true",
                    help="arrivals at the live add_request times (the engine model alone, see above)")
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
    if args.live_door:
        door_compare(args.folder, sc, reqs)
        return
    steps = _lines(args.folder / "reqtrace.jsonl.steps")
    lt, ld, _ = live_steps(steps)
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
    per_request_split(steps, trace, run, st, sd, se)


if __name__ == "__main__":
    main()
