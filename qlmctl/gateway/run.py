"""A live run (`qlmctl serve --trace`): a gateway with one policy in front of the scenario's engines, a trace
replayed through it by the replay client, and the same summary and result files as `simulate`.

What `qlmctl.runner` is to a simulation; the engines' own latency histograms over the run go into the
summary (`engine_metrics`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

from qlmctl.client.replay import LiveRun, merge_server_side, replay, replay_in_subprocess
from qlmctl.core.request import Request
from qlmctl.engines.base import EngineTotals
from qlmctl.engines.totals import engine_totals_delta
from qlmctl.gateway.server import Gateway
from qlmctl.metrics import summarize


async def run_live(
    scenario: Any,
    policy: str,
    requests: Sequence[Request],
    *,
    engines: Any = None,
    swap_control: Any = None,
    concurrency: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    keep_text: bool = False,
    wait_healthy_s: float = 60.0,
    stop: asyncio.Event | None = None,
    client_process: bool = True,
    workers: int = 1,
    client_procs: int = 1,
) -> LiveRun:
    """Start a gateway with `policy` in front of the scenario's engines, replay `requests`, stop it.

    Once `stop` is set (SIGTERM), no more requests are sent and the gateway drains (`Gateway.drain`).
    The client runs in a process of its own unless `client_process` is False (then it shares the
    gateway's event loop: for tests that patch something in this process). `workers` > 1: the gateway's
    HTTP side runs in that many relay processes (`qlmctl.gateway.workers`); `client_procs` > 1: the client in
    that many processes.

    Besides `summarize`'s keys, the summary has the gateway's event-loop lag over the run
    (`gateway_loop_lag_{p50,p99,max}_ms`) and `engine_metrics`: per engine, what its vLLM latency
    histograms and counters gained during the run (`EngineServer.run_totals`; vLLM's are
    `qlmctl.engines.vllm.RUN_HISTOGRAMS` and `RUN_COUNTERS`).
    """
    gw = Gateway(scenario, policy, port=0, engines=engines, swap_control=swap_control, workers=workers)
    await gw.start(wait_healthy_s)
    draining = None
    if stop is not None:
        async def drain_on_stop() -> None:
            await stop.wait()
            await gw.drain()

        draining = asyncio.ensure_future(drain_on_stop())
    if client_process:
        client = functools.partial(replay_in_subprocess, processes=client_procs)
    else:
        client = replay
    try:
        before = await _scrape_engines(gw.cluster)
        res = await client(gw.url, requests, speedup=gw.cluster.speedup, concurrency=concurrency,
                           progress=progress, keep_text=keep_text, api_key=gw.api_key, stop=stop)
        after = await _scrape_engines(gw.cluster)
    finally:
        if draining is not None:
            draining.cancel()
        await gw.stop()
    cluster = gw.cluster
    merge_server_side(res, cluster.by_external)
    # Both are time.monotonic(), also when the client ran in another process (a system-wide clock).
    shift = (res.t0 - cluster.t0) * cluster.speedup
    timeline = [(t - shift, *rest) for t, *rest in cluster.timeline]
    busy = {str(i["instance_id"]): i["busy_s"] for i in cluster.instance_stats()}
    summary = summarize(
        res.requests,
        instance_busy_s=busy,
        num_swaps=cluster.num_swaps,
        itls=res.itls,
        extra={
            "policy": policy,
            "scenario": scenario.spec.name,
            "backend": "live",
            "speedup": cluster.speedup,
            "live_wall_s": res.wall_s,
            "engines": [e.url for inst in cluster.instances for e in inst.engines.values()],
            "schedule_calls": cluster.schedule_calls,
            "policy_stats": gw.policy.stats_dict(),
            **gw.loop_lag.summary(),
            **res.client,
            "gateway_tokenizer": gw.tokenizers,
            "engine_metrics": _engine_deltas(before, after),
        },
    )
    return LiveRun(policy, res.requests, summary, timeline, res, res.texts)


EngineKey = str
"""An engine in `engine_metrics`: its instance's name, or "instance/model" on an instance with several."""


async def _scrape_engines(cluster: Any, timeout_s: float = 5.0) -> dict[EngineKey, EngineTotals | str]:
    """Every engine's cumulative latency histograms and counters; an error message where it failed."""
    keyed = [(inst.name if len(inst.engines) == 1 else f"{inst.name}/{model}", e)
             for inst in cluster.instances for model, e in inst.engines.items()]

    async def one(e: Any) -> EngineTotals | str:
        try:
            return await e.server.run_totals(timeout_s)
        except Exception as exc:  # noqa: BLE001 - a missing scrape is reported, never fatal
            return f"{type(exc).__name__}: {exc}"

    got = await asyncio.gather(*(one(e) for _, e in keyed))
    return {key: value for (key, _), value in zip(keyed, got)}


def _engine_deltas(before: dict[EngineKey, EngineTotals | str],
                   after: dict[EngineKey, EngineTotals | str]) -> dict[EngineKey, dict[str, Any]]:
    out: dict[EngineKey, dict[str, Any]] = {}
    for key, end in after.items():
        start = before.get(key, EngineTotals())
        if isinstance(start, str) or isinstance(end, str):
            out[key] = {"error": start if isinstance(start, str) else end}
        else:
            out[key] = engine_totals_delta(start, end)
    return out
