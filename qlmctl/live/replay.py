"""Live trace replay: send a trace's requests to an OpenAI-compatible server at their arrival times.

Each request becomes a streamed /v1/completions call with a synthetic prompt of its prompt length
(`w<i>` words: one word is one token under qlmctl's synthetic tokenizer, which the emulator uses),
`max_tokens` = its output length, `ignore_eos` and temperature 0, and its SLO class in the
`x-slo-class` header. Latencies are measured on the client side as vLLM's serving benchmark does:
TTFT from sending to the first token, ITL between successive token chunks, E2EL from sending to the
end of the stream; they are scaled by `speedup` into scenario seconds.

`run_live` does one policy's whole live run in this process: a gateway with that policy in front of
the scenario's engines, the replay through it, and the same summary and result files as `simulate`.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from qlmctl.core.request import Request
from qlmctl.live.http import HTTPError, Pool, sse_data

VOCAB = 32000
"""Synthetic prompt words are w0 .. w31999."""


def synthetic_prompt(num_tokens: int, salt: int = 0) -> str:
    """`num_tokens` words `w<i>`; `salt` varies the words so that prompts share no prefix."""
    start = (salt * 7919) % VOCAB
    return " ".join([f"w{(start + j) % VOCAB}" for j in range(num_tokens)])


@dataclass
class ReplayResult:
    """A replay's requests with their client-side lifecycle (scenario seconds from the replay's start)."""

    requests: list[Request]
    itls: list[list[float]]
    """Per request, its inter-token latencies (s), for `metrics.summarize(itls=...)`."""
    texts: list[str] | None
    """Per request, the text received (when asked for)."""
    usage_tokens: list[int | None]
    """Per request, completion_tokens of the final usage chunk (None when none came)."""
    usage_prompt_tokens: list[int | None]
    """Per request, prompt_tokens of the final usage chunk: the engine's count (a BOS token included)."""
    wall_s: float
    t0: float
    """time.monotonic() at the replay's time zero."""


async def replay(
    url: str,
    requests: Sequence[Request],
    *,
    speedup: float = 1.0,
    concurrency: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    keep_text: bool = False,
    api_key: str | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Send `requests` (fresh copies are filled in) to the server at `url` at arrival_s / speedup.

    Args:
        url: Base URL of the server (http://host:port, without /v1).
        requests: What to send, with arrival times in scenario seconds.
        speedup: Scenario seconds per wall second (arrivals are compressed, latencies stretched back).
        concurrency: At most this many requests open at once; later ones wait (and are sent late).
        progress: Called with (finished, total) as requests end.
        keep_text: Keep each answer's text in the result.
        api_key: Sent as a bearer token.
        stop: Once set, no more requests are sent (those left get an error); those sent run to their end.
    """
    reqs = [copy.copy(r) for r in sorted(requests, key=lambda r: (r.arrival_s, r.request_id))]
    n = len(reqs)
    out = ReplayResult(reqs, [[] for _ in range(n)], [""] * n if keep_text else None, [None] * n, [None] * n,
                       0.0, 0.0)
    sem = asyncio.Semaphore(concurrency)
    auth = [("authorization", f"Bearer {api_key}")] if api_key else []
    pool = Pool(url, max_idle=concurrency)
    done = 0
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> None:
        nonlocal done
        try:
            await _send(pool, reqs[i], i, out, speedup, auth)
        finally:
            sem.release()
            done += 1
            if progress is not None:
                progress(done, n)

    try:
        t0 = out.t0 = time.monotonic()
        base = reqs[0].arrival_s if reqs else 0.0
        for i, r in enumerate(reqs):
            delay = (r.arrival_s - base) / speedup - (time.monotonic() - t0)
            if delay > 0:
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.wait([asyncio.ensure_future(stop.wait())], timeout=delay)
            if stop is not None and stop.is_set():
                for rest in reqs[i:]:
                    rest.error = "not sent: the replay was stopped"
                break
            await sem.acquire()
            tasks.append(loop.create_task(one(i)))
        await asyncio.gather(*tasks)
        out.wall_s = time.monotonic() - t0
    finally:
        for t in tasks:
            t.cancel()
        await pool.aclose()
    return out


async def _send(pool: Pool, r: Request, i: int, out: ReplayResult, speedup: float,
                auth: list[tuple[str, str]]) -> None:
    body = orjson.dumps({
        "model": r.model,
        "prompt": synthetic_prompt(r.prompt_tokens, r.request_id),
        "max_tokens": r.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    headers = [("content-type", "application/json"), ("x-slo-class", r.slo_class),
               ("x-request-id", str(r.request_id)), *auth]
    t0 = out.t0
    start = time.monotonic()
    r.arrival_s = (start - t0) * speedup
    last = start
    tokens = 0
    parts: list[str] = []
    keep = out.texts is not None
    gaps = out.itls[i]
    resp = None
    try:
        resp = await pool.request("POST", "/v1/completions", body, headers)
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {_message(await resp.read())}"
            return
        async for payloads in sse_data(resp):
            now = time.monotonic()
            for data in payloads:
                if data == b"[DONE]":
                    r.finish_s = (now - t0) * speedup
                    continue
                ev = orjson.loads(data)
                if "error" in ev:
                    r.error = f"stream error: {_message(data)}"
                    continue
                u = ev.get("usage")
                if u and not ev.get("choices"):
                    out.usage_tokens[i] = u.get("completion_tokens")
                    out.usage_prompt_tokens[i] = u.get("prompt_tokens")
                for c in ev.get("choices") or ():
                    text = c.get("text")
                    if not text:
                        continue
                    tokens += 1
                    if keep:
                        parts.append(text)
                    if r.first_token_s is None:
                        r.first_token_s = (now - t0) * speedup
                    else:
                        gaps.append((now - last) * speedup)
                    last = now
        if r.finish_s is None and r.error is None:
            r.error = "stream ended without [DONE]"
    except HTTPError as e:
        r.error = str(e)
    finally:
        if resp is not None:
            resp.close()
        if r.error is not None:
            r.finish_s = None
        r.generated_tokens = tokens if out.usage_tokens[i] is None else out.usage_tokens[i]
        if keep:
            out.texts[i] = "".join(parts)  # type: ignore[index]


def _message(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
        err = body.get("error", body)
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:200].decode(errors="replace")


def merge_server_side(result: ReplayResult, server: dict[str, Request]) -> None:
    """Copy what only the gateway knows (queueing, placement, evictions) onto the client-side records.

    `server` maps x-request-id to the gateway's Request. The dispatch time is re-based on the client's
    clock: client arrival + the gateway's queueing delay.
    """
    for r in result.requests:
        s = server.get(str(r.request_id))
        if s is None:
            continue
        if s.dispatch_s is not None:
            r.dispatch_s = r.arrival_s + (s.dispatch_s - s.arrival_s)
        r.instance_id = s.instance_id
        r.num_evictions = s.num_evictions
        r.num_preemptions = s.num_preemptions


@dataclass
class LiveRun:
    """One policy's live run: what `runner.PolicyRun` is to a simulation."""

    policy: str
    requests: list[Request]
    summary: dict[str, Any]
    timeline: list[tuple[float, str, int, str, str, float]]
    replay: ReplayResult
    texts: list[str] | None = None


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
) -> LiveRun:
    """Start a gateway with `policy` in front of the scenario's engines, replay `requests`, stop it.

    Once `stop` is set (SIGTERM), no more requests are sent and the gateway drains (`Gateway.drain`).
    """
    from qlmctl.live.gateway import Gateway
    from qlmctl.metrics import summarize

    gw = Gateway(scenario, policy, port=0, engines=engines, swap_control=swap_control)
    await gw.start(wait_healthy_s)
    draining = None
    if stop is not None:
        async def drain_on_stop() -> None:
            await stop.wait()
            await gw.drain()

        draining = asyncio.ensure_future(drain_on_stop())
    try:
        res = await replay(gw.url, requests, speedup=gw.cluster.speedup, concurrency=concurrency,
                           progress=progress, keep_text=keep_text, api_key=gw.api_key, stop=stop)
    finally:
        if draining is not None:
            draining.cancel()
        await gw.stop()
    cluster = gw.cluster
    merge_server_side(res, cluster.by_external)
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
            "policy_stats": _policy_stats(gw.policy),
        },
    )
    return LiveRun(policy, res.requests, summary, timeline, res, res.texts)


def _policy_stats(policy: Any) -> dict[str, Any]:
    stats = getattr(policy, "stats", None)
    if stats is None:
        return {}
    if hasattr(stats, "__dict__"):
        return dict(stats.__dict__)
    return {k: getattr(stats, k) for k in getattr(stats, "__slots__", ())}


def save_live(run: LiveRun, scenario: Any, out_dir: Any) -> Any:
    """Write a live run like a simulated one: `<out_dir>/<policy>/` (requests, summary, scenario, timeline)."""
    import pandas as pd

    from qlmctl.report import write_results
    from qlmctl.runner import TIMELINE_COLUMNS

    frame = pd.DataFrame(run.timeline, columns=TIMELINE_COLUMNS)
    return write_results(out_dir, run.policy, run.requests, run.summary, scenario.dump(), frame)
