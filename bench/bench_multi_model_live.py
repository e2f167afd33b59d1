"""Multi-model swaps, simulated vs live: scenarios/multi_model_live.yaml (3 models on 2 GPUs, six emulated vLLM
servers started by `qlmctl serve --launch` with sleep mode) replayed live and simulated, per policy.

    python bench/bench_multi_model_live.py [-n REQUESTS] [-p fcfs,qlm] [--out DIR]

Prints SLO attainment (overall and per class), swaps and TTFT p50 in both worlds; exits 1 when an overall
attainment differs by more than 3 points (the target of issue 18). The live run takes about 2 minutes.
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
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mml-"))
    cap = ["-n", str(args.n)] if args.n else []
    for world, cmd in (("live", ["serve", "-s", str(SCENARIO), "--launch", "--replay"]),
                       ("sim", ["simulate", "-s", str(SCENARIO)])):
        subprocess.run([sys.executable, "-m", "qlmctl.cli", *cmd, "-p", args.p, *cap, "-o", str(out / world)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    worst = 0.0
    print("| policy | world | SLO attainment | interactive | batch-1 | batch-2 | swaps | TTFT p50 (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for policy in args.p.split(","):
        got = {}
        for world in ("sim", "live"):
            s = json.loads((out / world / policy / "summary.json").read_text())
            got[world] = s["slo_attainment"]
            by = s["slo_attainment_by_class"]
            print(f"| {policy} | {world} | {s['slo_attainment']:.1%} | {by.get('interactive', 0):.1%} | "
                  f"{by.get('batch-1', 0):.1%} | {by.get('batch-2', 0):.1%} | {s['num_swaps']} | "
                  f"{s['p50_ttft_ms'] / 1e3:.2f} |")
        worst = max(worst, abs(got["sim"] - got["live"]))
    print(f"\nlargest attainment gap: {worst * 100:.1f} points (target: within {TOLERANCE * 100:.0f}); "
          f"results in {out}")
    return 1 if worst > TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
