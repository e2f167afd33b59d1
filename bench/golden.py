"""Behaviour check for refactors: every bundled scenario under every policy, summaries to one JSON file.

    python bench/golden.py write /tmp/before.json          # at the old commit
    python bench/golden.py write /tmp/after.json           # at the new one
    python bench/golden.py diff /tmp/before.json /tmp/after.json

Wall-clock fields (sim_wall_s and the like) and the loop's event count are left out; everything else must match
exactly for a change that claims to keep behaviour. `-n N` caps each scenario's requests (default: the scenario's own).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WALL_KEYS = {"sim_wall_s", "wall_s", "date", "created", "command", "solve_s", "solve_time_s", "sim_events",
             "sim_build"}
"""Keys that measure the run, not its result: wall times, and the event loop's iterations (a speed-up may
skip events that change nothing)."""


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in sorted(x.items()) if k not in WALL_KEYS and not k.endswith("_wall_s")}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.12g}")
    return x


def _point(args: tuple[str, str, int | None]) -> tuple[str, dict]:
    from qlmctl.runner import simulate
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    path, policy, cap = args
    over = {"workload": {"max_requests": cap}} if cap else None
    try:
        sc = load_scenario(path, over)
        reqs, _ = build_requests(sc)
        run = simulate(sc, policy, reqs)
        return f"{Path(path).stem}/{policy}", _clean(run.summary)
    except Exception as e:  # noqa: BLE001 - a scenario that cannot run here (missing trace) is recorded
        return f"{Path(path).stem}/{policy}", {"error": f"{type(e).__name__}: {e}"}


def write(out: str, cap: int | None, policies: list[str] | None) -> None:
    from qlmctl.policies import policy_names

    pols = policies or [p for p in policy_names() if p != "qlm-lp"]  # qlm-lp is bound by a wall-clock limit
    scen = sorted(str(p) for p in (REPO / "scenarios").glob("*.yaml"))
    jobs = [(s, p, cap) for s in scen for p in pols]
    with mp.get_context("spawn").Pool(2) as pool:
        res = dict(pool.imap_unordered(_point, jobs))
    Path(out).write_text(json.dumps(dict(sorted(res.items())), indent=1))
    print(f"{len(res)} runs -> {out}")


def diff(a: str, b: str) -> int:
    A, B = _clean(json.loads(Path(a).read_text())), _clean(json.loads(Path(b).read_text()))
    bad = 0
    for k in sorted(set(A) | set(B)):
        if A.get(k) != B.get(k):
            bad += 1
            da, db = A.get(k) or {}, B.get(k) or {}
            keys = [x for x in sorted(set(da) | set(db)) if da.get(x) != db.get(x)]
            print(f"{k}: " + ", ".join(f"{x} {da.get(x)!r} -> {db.get(x)!r}" for x in keys[:6]))
    print(f"{len(set(A) | set(B))} runs, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    cap = None
    pols = None
    if "-n" in argv:
        i = argv.index("-n")
        cap = int(argv[i + 1])
        del argv[i:i + 2]
    if "-p" in argv:
        i = argv.index("-p")
        pols = argv[i + 1].split(",")
        del argv[i:i + 2]
    if argv[0] == "write":
        write(argv[1], cap, pols)
    else:
        sys.exit(diff(argv[1], argv[2]))
