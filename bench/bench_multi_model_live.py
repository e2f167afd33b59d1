"""Multi-model swaps, simulated vs live: scenarios/multi_model_live.yaml (3 models on 2 GPUs, six emulated vLLM
servers started by `qlmctl serve --launch` with sleep mode) replayed live and simulated, per policy.

    python bench/bench_multi_model_live.py [-n REQUESTS] [-p fcfs,qlm] [--speedup 1] [--out DIR]

Prints SLO attainment (overall and per class), swaps and TTFT p50 in both worlds, and the range the simulation
spans when each request arrives up to 0.5 s late (`late_arrival_range`, 12 draws): on this scenario qlm's swaps
hang on sub-second timing, and a live run is one draw of it. Exits 1 when a live attainment lies more than 3 points
outside that range (the target of issue 18).

The live side runs in real time by default (`--speedup 1`, about 3 minutes a policy), not at the scenario's 4x: on a
2-core host eight processes (gateway, client, six emulators) at 4x left the gateway's event loop 107 ms late at p99
(0.43 scenario seconds), and qlm swapped 22 times where the simulation swapped 12.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "multi_model_live.yaml"
TOLERANCE = 0.03


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=None, help="cap the requests (default: the scenario's 2,000)")
    ap.add_argument("-p", default="fcfs,qlm")
    ap.add_argument("--speedup", type=float, default=1.0, help="live side: scenario seconds per wall second")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mml-"))
    cap = ["-n", str(args.n)] if args.n else []
    for world, cmd in (("live", ["serve", "-s", str(SCENARIO), "--launch", "--replay", "--speedup", str(args.speedup)]),
                       ("sim", ["simulate", "-s", str(SCENARIO)])):
        subprocess.run([sys.executable, "-m", "qlmctl.cli", *cmd, "-p", args.p, *cap, "-o", str(out / world)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    from qlmctl.runner import late_arrival_range
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    sc = load_scenario(SCENARIO, {"workload": {"max_requests": args.n}} if args.n else None)
    requests, _ = build_requests(sc)
    worst = 0.0
    print("| policy | world | SLO attainment | interactive | batch-1 | batch-2 | swaps | TTFT p50 (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ranges = {}
    for policy in args.p.split(","):
        got = {}
        for world in ("sim", "live"):
            s = json.loads((out / world / policy / "summary.json").read_text())
            got[world] = s["slo_attainment"]
            by = s["slo_attainment_by_class"]
            print(f"| {policy} | {world} | {s['slo_attainment']:.1%} | {by.get('interactive', 0):.1%} | "
                  f"{by.get('batch-1', 0):.1%} | {by.get('batch-2', 0):.1%} | {s['num_swaps']} | "
                  f"{s['p50_ttft_ms'] / 1e3:.2f} |")
        lo, hi = ranges[policy] = late_arrival_range(sc, policy, requests, late_s=0.5, draws=12,
                                                     as_they_are=got["sim"])
        worst = max(worst, lo - got["live"], got["live"] - hi)
    for policy, (lo, hi) in ranges.items():
        print(f"\n{policy}: simulated {lo:.1%}-{hi:.1%} with arrivals up to 0.5 s late", end="")
    print(f"\nlive furthest outside that range: {max(worst, 0.0) * 100:.1f} points (target: within "
          f"{TOLERANCE * 100:.0f}); results in {out}")
    return 1 if worst > TOLERANCE + 1e-9 else 0


if __name__ == "__main__":
    sys.exit(main())
