"""Sweep throughput: points per minute on a local process pool and on a local Ray instance.

A 200-point grid over the Azure conversation trace (4 policies x 2 fleets x 5 rates x 5 seeds,
2,000 requests per point) runs once on each executor, from an empty result store. Reported:
points per minute, the mean time a point spends inside its worker, and the overhead per point
(worker-seconds per point beyond that time: dispatch, transfer, idle tail), whose difference
between the two executors is what Ray adds. Ray's start-up is timed apart. The two tables are
checked equal.

    python bench/bench_sweep.py               # both executors, one worker per core
    python bench/bench_sweep.py --no-ray      # the local pool only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlmctl.sweep import LocalExecutor, ResultStore, SweepResult, build_plan, load_sweep, run_sweep  # noqa: E402
from qlmctl.sweep.tables import results_frame  # noqa: E402

TRACE = REPO.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"


def sweep_yaml(folder: Path, max_requests: int) -> Path:
    data = {
        "name": "bench",
        "scenarios": [str(REPO / "scenarios" / "default.yaml")],
        "policies": ["fcfs", "priority", "edf", "qlm"],
        "instances": [1, 2],
        "rates_rps": [10, 20, 30, 40, 60],
        "seeds": [0, 1, 2, 3, 4],
        "max_requests": max_requests,
        "duration_s": None,  # a fixed request count per point: this measures the executors, not capacity
        "overrides": {
            "workload": {"trace": str(TRACE)},
            "slo_classes": {"interactive": {"ttft_s": 5}, "batch-1": {"ttft_s": 20}, "batch-2": {"ttft_s": 60}},
        },
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed_run(plan, executor, store_dir: Path) -> tuple[SweepResult, float]:
    start = time.perf_counter()
    result = run_sweep(plan, executor, ResultStore(store_dir))
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-requests", type=int, default=2000, help="requests per point")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes / Ray CPUs")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    args = ap.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = sweep_yaml(folder, args.max_requests)
        plan = build_plan(load_sweep(path), path)
        n = len(plan.points)
        console.print(f"{n} points of {args.max_requests:,} requests ({TRACE.name}), {args.workers} workers")

        runs: dict[str, tuple[SweepResult, float, float]] = {}
        start = time.perf_counter()
        with LocalExecutor(args.workers) as ex:
            startup = time.perf_counter() - start
            result, wall = timed_run(plan, ex, folder / "local")
        runs["local pool"] = (result, wall, startup)

        if not args.no_ray:
            from qlmctl.sweep import RayExecutor

            start = time.perf_counter()
            with RayExecutor("local", num_cpus=args.workers) as ex:
                startup = time.perf_counter() - start
                result, wall = timed_run(plan, ex, folder / "ray")
            runs["local Ray"] = (result, wall, startup)

    table = Table(title=f"Sweep throughput: {n} points, {args.workers} workers")
    for col in ("executor", "start-up (s)", "sweep (s)", "points/min", "in worker (s/point)",
                "overhead (worker-s/point)", "failed"):
        table.add_column(col, justify="right" if col != "executor" else "left")
    overheads = {}
    for name, (result, wall, startup) in runs.items():
        frame = results_frame(result)
        in_worker = frame["wall_s"].mean()
        overheads[name] = wall * args.workers / n - in_worker
        table.add_row(name, f"{startup:.2f}", f"{wall:.1f}", f"{60 * n / wall:.0f}", f"{in_worker:.3f}",
                      f"{overheads[name]:.3f}", str(len(result.failed)))
    console.print(table)
    if len(runs) == 2:
        (a, *_), (b, *_) = runs.values()
        drop = ["wall_s", "worker", "sim_wall_s"]
        same = results_frame(a).drop(columns=drop).equals(results_frame(b).drop(columns=drop))
        extra = overheads["local Ray"] - overheads["local pool"]
        console.print(f"Ray adds {1000 * extra:.0f} ms of worker time per point; tables equal: {same}")


if __name__ == "__main__":
    main()
