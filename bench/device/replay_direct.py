"""Replay a scenario's workload straight to an engine server (vLLM, or `qlmctl emulate`), as a client talking to
vLLM directly does, and write the results like `qlmctl simulate` (policy label `direct`, or `direct-priority`
with --priority), with the server's own histogram and counter deltas (vLLM's /metrics) in `engine_metrics`.

    python bench/device/replay_direct.py -s SCENARIO --url http://127.0.0.1:8010 --rate R -n N -o DIR [--priority]
        [--client-procs K]

--priority sends each request's priority (its SLO class's, lower first) in the body, for a server started with
`--scheduling-policy priority`. The simulated side of such a run is policy `direct` with the engine's
scheduling policy set (bench/fidelity_compare.py does it).

--client-procs K sends from K client processes (`replay_in_subprocess`), each its share of the requests on one
schedule (default: one per 4 CPUs, 1 to 4, as `qlmctl replay`; 1: in this process). Each request's send stamp and the time its last byte was written go to
`<out>/<label>/client_sent.json` (seconds from `client_t0_mono`), to tell the client's part of the way in from the
server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qlmctl.client.replay import LiveRun, replay_from_processes, save_live  # noqa: E402
from qlmctl.engines import engine_kind  # noqa: E402
from qlmctl.engines.totals import engine_totals_delta  # noqa: E402
from qlmctl.metrics import summarize  # noqa: E402
from qlmctl.scenario import load_scenario  # noqa: E402
from qlmctl.workload import build_requests  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-s", "--scenario", type=Path, required=True)
    ap.add_argument("--url", default="http://127.0.0.1:8010")
    ap.add_argument("--rate", type=float, default=None, help="rescale arrivals to this rate, req/s")
    ap.add_argument("-n", type=int, default=None, help="cap the requests")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--priority", action="store_true", help="send each request's priority (vLLM priority scheduling)")
    ap.add_argument("--label", default=None)
    ap.add_argument("--client-procs", type=int, default=0,
                    help="client processes (1: this one; 0, the default: one per 4 CPUs, 1 to 4, as qlmctl replay)")
    args = ap.parse_args()
    over: dict = {"workload": {}}
    if args.rate:
        over["workload"]["target_rate_rps"] = args.rate
    if args.n:
        over["workload"]["max_requests"] = args.n
    sc = load_scenario(args.scenario, over)
    requests, report = build_requests(sc)
    for line in report.lines():
        print(line, flush=True)
    label = args.label or ("direct-priority" if args.priority else "direct")
    server = engine_kind("vllm").connect(args.url, 8)
    before = await server.run_totals()
    res = await replay_from_processes(args.url, requests, args.client_procs, concurrency=4096,
                                      send_priority=args.priority)
    after = await server.run_totals()
    await server.aclose()
    failed = [r.error for r in res.requests if r.error]
    summary = summarize(res.requests, itls=res.itls, extra={
        "policy": label, "scenario": sc.spec.name, "backend": "replay", "url": args.url, "speedup": 1.0,
        "live_wall_s": res.wall_s, "engine_metrics": {"gpu0": engine_totals_delta(before, after)},
        "client_t0_mono": res.t0,  # the send times' origin on the host's monotonic clock (vLLM's traces use it)
        **res.client})  # the client's own loop lag and CPU: a token it reads late is late in its TTFT
    folder = save_live(LiveRun(label, res.requests, summary, [], res), sc, args.out)
    (Path(folder) / "client_sent.json").write_text(json.dumps(
        [[r.request_id, r.arrival_s, s] for r, s in zip(res.requests, res.sent_s)]))
    deltas = summary["engine_metrics"]["gpu0"]
    q, h = deltas.get("vllm:prefix_cache_queries"), deltas.get("vllm:prefix_cache_hits")
    print(f"{label}: {summary['completed']}/{summary['num_requests']} completed, "
          f"TTFT p50 {summary['p50_ttft_ms']:.0f} ms, "
          f"p90 {summary['p90_ttft_ms']:.0f} ms, TPOT p50 {summary['p50_tpot_ms']:.1f} ms, E2EL p50 "
          f"{summary['p50_e2el_ms'] / 1e3:.2f} s, prefix hits {h}/{q}, failed {len(failed)} "
          f"({failed[0] if failed else ''}) -> {folder}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
