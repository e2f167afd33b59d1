"""Simulator speed: wall time and peak memory per policy.

    python bench/bench_simulate.py azure            # full Azure conversation trace (19,366 requests), 4 instances
    python bench/bench_simulate.py million          # synthetic 1,000,000 requests on 32 instances (qlm, fcfs)
    python bench/bench_simulate.py scaling          # 250k / 500k / 1M requests: does time double with requests?
    python bench/bench_simulate.py azure --against 65d5a0c [--reps 3]
                                                    # the same points at another commit, alternated on this machine

Each point runs in a fresh process so peak RSS is its own. Targets (issue 18): <= 1 s per policy for Azure,
<= 30 s and 1 GB for the million, time linear in requests. Each point is compared with its figure in
docs/benchmarks.md (the simulator tables, matched on point, policy and build): "regression" when it ran more than
20 % slower there (CPU seconds where the table has them, else wall seconds). A point runs the build that is
installed (a regular install compiles, an editable one is pure Python: setup.py); each point says which.

Machines differ (this project's development machine has run 1-3.5 times slower from one session to the next), so a
figure from another machine says little. `--against REV` runs each point at REV too (a temporary git worktree),
alternating with this checkout, `--reps` times each, and compares medians of CPU seconds on this machine: a
"regression" is more than 20 % slower than REV. Against the commit the table was measured at, the ratio times the
table's figure estimates this checkout on the table's machine. `--against REV --build compiled` compiles both
sides first (copies of this checkout's sources and of REV's, built in place as setup.py does; about two minutes
each on a 2-core machine), to compare the build a regular install runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import re
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AZURE = REPO.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
PROFILE = str(REPO / "scenarios" / "profiles" / "h200-llama-3.1-8b.yaml")


def scenario_dict(instances: int, workload: dict) -> dict:
    return {
        "name": "bench",
        "models": {"llama-3.1-8b": {"profile_file": PROFILE}},
        "cluster": {"instances": [{"count": instances, "model": "llama-3.1-8b"}]},
        "slo_classes": {"interactive": {"ttft_s": 20}, "batch-1": {"ttft_s": 60}, "batch-2": {"ttft_s": 3600}},
        "workload": {**workload, "slo_class": {"split": {"interactive": 0.3, "batch-1": 0.3, "batch-2": 0.4}}},
    }


def point(args: tuple[str, int, dict, str], out: mp.Queue) -> None:
    import simulator
    from qlmctl.runner import simulate
    from qlmctl.scenario import Scenario, ScenarioSpec
    from qlmctl.workload import build_requests

    name, instances, workload, policy = args
    sc = Scenario(ScenarioSpec.model_validate(scenario_dict(instances, workload)), REPO / "bench" / "x.yaml")
    t0 = time.perf_counter()
    reqs, _ = build_requests(sc)
    t_build = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    run = simulate(sc, policy, reqs, copy_requests=False)  # as `qlmctl simulate` runs its last (or only) policy
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    out.put({"point": name, "policy": policy, "build": simulator.build(), "requests": len(reqs), "instances": instances,
             "build_s": round(t_build, 2), "simulate_s": round(run.result.wall_s, 2),
             "with_summary_s": round(wall, 2), "cpu_s": round(cpu, 2), "events": run.result.events,
             "peak_rss_gb": round(rss_gb, 2),
             "slo_attainment": round(run.summary["slo_attainment"], 4),
             "sim_duration_s": round(run.result.sim_duration_s, 1)})


def run_point(args) -> dict:
    """Run one point in a fresh process (its own peak RSS); a child that dies is an error, not a hang."""
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=point, args=(args, q))
    p.start()
    while True:
        try:
            res = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive() and q.empty():
                raise SystemExit(f"bench point {args[0]} / {args[3]} failed: its process exited with code {p.exitcode}"
                                 " (its traceback is above)")
    p.join()
    return res


DOCS = REPO / "docs" / "benchmarks.md"
REGRESSION = 1.2
"""A point is a regression when it takes more than this times its documented figure."""


def documented() -> dict[tuple[str, str, str], dict[str, float]]:
    """(point, policy, build) -> {"simulate_s", "cpu_s"} from docs/benchmarks.md's simulator tables (rows whose
    first cell is a bench point name, e.g. `azure-full`; the build from a `build` column, else "pure")."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    if not DOCS.exists():
        return out
    header: list[str] | None = None
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| point |"):
            header = cells if "simulate (s)" in cells else None  # the figures table, not the before/after one
            continue
        named = re.fullmatch(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*", cells[0])
        if header is None or len(cells) != len(header) or not named:
            if not line.startswith("|"):
                header = None
            continue
        row = dict(zip(header, cells))
        fig = {}
        for key, col in (("simulate_s", "simulate (s)"), ("cpu_s", "+summary, CPU (s)")):
            try:
                fig[key] = float(row.get(col, "").replace(",", ""))
            except ValueError:
                pass
        out.setdefault((cells[0], row.get("policy", ""), row.get("build", "pure")), fig)
    return out


def verdict(res: dict, docs: dict[tuple[str, str, str], dict[str, float]]) -> str:
    fig = docs.get((res["point"], res["policy"], res["build"]))
    if not fig:
        return f"no documented figure for the {res['build']} build"
    key = "cpu_s" if "cpu_s" in fig else "simulate_s"
    mine = res["cpu_s"] if key == "cpu_s" else res["simulate_s"]
    ratio = mine / fig[key]
    word = "REGRESSION" if ratio > REGRESSION else "ok"
    return f"{word}: {mine:g} s vs {fig[key]:g} s documented ({ratio:.2f}x, {key})"


def point_in(tree: Path, args: tuple[str, int, dict, str]) -> dict:
    """`point(args)` in a fresh process that imports qlmctl and simulator from `tree` (a checkout)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(args), "--tree", str(tree)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"point {args[0]} {args[3]} at {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _point_here(args_json: str, tree: str) -> None:
    """Child of `point_in`: run one point with `tree`'s code and print its result as JSON."""
    sys.path.insert(0, tree)
    import qlmctl
    import simulator

    for mod in (qlmctl, simulator):
        if not Path(mod.__file__).resolve().is_relative_to(Path(tree).resolve()):
            raise SystemExit(f"{mod.__name__} imported from {mod.__file__}, not from {tree}")
    name, instances, workload, policy = json.loads(args_json)
    q: queue.Queue = queue.Queue()
    point((name, instances, workload, policy), q)
    print(json.dumps(q.get()))


def compiled_copy(src: Path, dst: Path) -> Path:
    """`src`'s sources compiled in place at `dst` (setup.py's `build_in_place`, as a regular install builds them)."""
    print(f"compiling {src} ...", file=sys.stderr, flush=True)
    done = runpy.run_path(str(REPO / "setup.py"), run_name="bench")["build_in_place"](src, dst)
    if done.returncode != 0:
        raise SystemExit(f"compiling {src} failed:\n{done.stderr[-3000:]}")
    return dst


def against(points: list[tuple[str, int, dict, str]], rev: str, reps: int, build: str = "pure") -> None:
    """Each point here and at `rev`, alternated `reps` times; medians of CPU seconds and their ratio. `build`
    "compiled" compiles both sides first."""
    known = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if known.returncode != 0:
        raise SystemExit(f"--against {rev}: no such commit in {REPO}")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(other), rev], check=True)
        try:
            here = REPO
            if build == "compiled":
                here = compiled_copy(REPO, Path(tmp) / "here")
                compiled_copy(other, other)
            regressions = 0
            print(f"| point | policy | here, CPU (s) | {rev}, CPU (s) | ratio (min-max) | peak RSS here / {rev} (GB) "
                  "| build here / there |")
            print("|---|---|---:|---:|---:|---:|---|")
            for args in points:
                mine, theirs = [], []
                for _ in range(reps):
                    mine.append(point_in(here, args))
                    theirs.append(point_in(other, args))
                a = statistics.median(r["cpu_s"] for r in mine)
                b = statistics.median(r["cpu_s"] for r in theirs)
                ratios = [x["cpu_s"] / y["cpu_s"] for x, y in zip(mine, theirs)]
                regressions += a / b > REGRESSION
                print(f"| {args[0]} | {args[3]} | {a:.2f} | {b:.2f} | {a / b:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
                      f"| {max(r['peak_rss_gb'] for r in mine)} / {max(r['peak_rss_gb'] for r in theirs)} "
                      f"| {mine[0]['build']} / {theirs[0]['build']} |", flush=True)
            if regressions:
                print(f"\n{regressions} regression(s): slower than {rev} by more than {REGRESSION - 1:.0%}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False)


def main(which: str, rev: str | None = None, reps: int = 3, build: str = "pure") -> None:
    points = []
    if which in ("azure", "all"):
        for pol in ("fcfs", "priority", "edf", "qlm"):
            points.append(("azure-full", 4, {"trace": str(AZURE)}, pol))
    if which in ("million", "all"):
        syn = {"synthetic": {"rate_rps": 800, "num_requests": 1_000_000, "lengths_from": str(AZURE)}}
        for pol in ("fcfs", "qlm"):
            points.append(("synthetic-1M", 32, syn, pol))
    if which in ("scaling", "all"):
        for n in (250_000, 500_000, 1_000_000):
            syn = {"synthetic": {"rate_rps": 800, "num_requests": n, "lengths_from": str(AZURE)}}
            points.append((f"synthetic-{n // 1000}k", 32, syn, "qlm"))
    if rev is not None:
        against(points, rev, reps, build)
        return
    rows = []
    docs = documented()
    regressions = 0
    for args in points:
        res = run_point(args)
        rows.append(res)
        res["verdict"] = verdict(res, docs)
        regressions += res["verdict"].startswith("REGRESSION")
        print(json.dumps(res), flush=True)
    print("\n| point | policy | build | requests | instances | simulate (s) | +summary (s) | +summary, CPU (s) "
          "| peak RSS (GB) | SLO attainment |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['point']} | {r['policy']} | {r['build']} | {r['requests']:,} | {r['instances']} | {r['simulate_s']} | "
              f"{r['with_summary_s']} | {r['cpu_s']} | {r['peak_rss_gb']} | {r['slo_attainment']:.1%} |")
    print()
    for r in rows:
        print(f"{r['point']} {r['policy']}: {r['verdict']}")
    if regressions:
        print(f"\n{regressions} regression(s): slower than docs/benchmarks.md by more than {REGRESSION - 1:.0%}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Simulator speed: wall time and peak memory per policy.")
    ap.add_argument("which", nargs="?", default="azure", choices=("azure", "million", "scaling", "all"))
    ap.add_argument("--against", metavar="REV", help="also run each point at this commit, alternated, and compare")
    ap.add_argument("--reps", type=int, default=3, help="runs of each point per side with --against")
    ap.add_argument("--build", choices=("pure", "compiled"), default="pure",
                    help="with --against: the build both sides run (compiled: both built first, ~2 min each)")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # the child of `point_in`
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point is not None:
        _point_here(args.point, args.tree)
    else:
        if args.build != "pure" and args.against is None:
            ap.error("--build applies to --against; without it a point runs the installed build")
        main(args.which, args.against, args.reps, args.build)
