"""Live trace replay: send a trace's requests to an OpenAI-compatible server at their arrival times.

Each request becomes a streamed /v1/completions call with a synthetic prompt of its prompt length
(`w<i>` words: one word is one token under qlmctl's synthetic tokenizer, which the emulator uses),
`max_tokens` = its output length, `ignore_eos` and temperature 0, and its SLO class in the
`x-slo-class` header. The client is httpx (`qlmctl.client.http`): http or https, proxies from the
environment, any OpenAI-compatible base URL. Latencies are measured on the client side as vLLM's
serving benchmark does: TTFT from sending to the first token, ITL between successive token chunks,
E2EL from sending to the end of the stream; they are scaled by `speedup` into scenario seconds. Chunks
that arrive in one network read share the gap since the previous read (their times interpolated), so
that a client reading late does not report gaps of 0 and one long one.

`replay_in_subprocess` runs the client in a process of its own, so that parsing hundreds of streams does
not compete with a gateway in this process for its event loop (`qlmctl.gateway.run`; vLLM's benchmark
client is not in vLLM's process either). `LiveRun` and `save_live` write a replay's results like a
simulation's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import multiprocessing
import os
import pickle
import random
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from qlmctl.client.http import SSEParser, describe_error, error_message, make_client, status_hint
from qlmctl.core.request import Request
from qlmctl.looplag import LoopLagMonitor, ms_summary
from simulator.prefix import PromptBlocks

COMPLETIONS = "/v1/completions"

VOCAB = 32000
"""Synthetic prompt words are w0 .. w31999."""


def synthetic_prompt(num_tokens: int, salt: int = 0, prefix: PromptBlocks | None = None,
                     nonce: int | None = None) -> str:
    """`num_tokens` words `w<i>`; `salt` varies the words so that prompts share no prefix.

    With a `nonce` (one per replay), the words are drawn at random from `nonce` and `salt`, and a request's
    `prefix` blocks (its trace's block hashes, or a shared system prompt) from `nonce` and each block's hash:
    requests that share blocks share those words, so a server's prefix cache sees the sharing the trace
    describes, and nothing else (not even the prompts of another replay, which has another nonce)."""
    if nonce is None and prefix is None:
        start = (salt * 7919) % VOCAB
        return " ".join([f"w{(start + j) % VOCAB}" for j in range(num_tokens)])
    nonce = nonce or 0
    words: list[int] = []
    if prefix is not None:
        bt = prefix.block_tokens
        for h in prefix.hashes:
            if len(words) >= num_tokens:
                break
            rng = np.random.default_rng([nonce & 0xFFFFFFFF, bt, h & 0xFFFFFFFFFFFF, 1])
            words += rng.integers(0, VOCAB, min(bt, num_tokens - len(words))).tolist()
    if len(words) < num_tokens:
        rng = np.random.default_rng([nonce & 0xFFFFFFFF, salt & 0xFFFFFFFFFFFF, 2])
        words += rng.integers(0, VOCAB, num_tokens - len(words)).tolist()
    return " ".join([f"w{w}" for w in words])


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
    client: dict[str, float | None] = field(default_factory=dict)
    """The client's own load over the replay, for a run's summary: its event-loop lag (`client_loop_lag_p50_ms`,
    `_p99_ms`, `_max_ms`: a token it is late to read is late in the TTFT and ITL it measures), its CPU seconds
    per wall second (`client_cpu_per_s`), how late it sent (`client_send_late_*`: from each request's arrival to
    its send stamp, where TTFT starts) and how long a request took from that stamp to its last byte written
    (`client_send_delay_*`: the pool, a new connection, the loop's lag, all inside TTFT); `client_processes`.
    With several client processes the lags are the worst process's and the CPU their sum."""
    sent_s: list[float | None] = field(default_factory=list)
    """Per request, when its last byte was written to the server (scenario seconds; None if it never was)."""


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
    model_map: dict[str, str] | None = None,
    verify: bool = True,
    prompt_nonce: int | None = None,
    send_priority: bool = False,
    wait_start: Callable[[], Awaitable[float]] | None = None,
    base_s: float | None = None,
) -> ReplayResult:
    """Send `requests` (fresh copies are filled in) to the server at `url` at arrival_s / speedup.

    Args:
        url: The server: its root or an OpenAI base URL (`http://host:8000`, `https://host/v1`; no scheme:
            http). See `qlmctl.client.http.server_url`.
        requests: What to send, with arrival times in scenario seconds.
        speedup: Scenario seconds per wall second (arrivals are compressed, latencies stretched back).
        concurrency: At most this many requests open at once; later ones wait (and are sent late).
        progress: Called with (finished, total) as requests end.
        keep_text: Keep each answer's text in the result.
        api_key: Sent as a bearer token.
        stop: Once set, no more requests are sent (those left get an error); those sent run to their end.
        model_map: The model name to send for each request's model (default: its own).
        verify: Check the server's TLS certificate.
        prompt_nonce: What the prompts' words are drawn from (`synthetic_prompt`); default: a random one, so
            that no replay hits the prefix cache with another's prompts.
        send_priority: Send each request's SLO-class priority as vLLM's `priority` field (lower first), for a
            server started with `--scheduling-policy priority` (a server in fcfs mode refuses it).
        wait_start: Awaited once the client is set up; returns the replay's time zero, a `time.monotonic()`
            instant (default: now), and sending waits for it.
        base_s: The scenario time sent at time zero (default: the first request's arrival). With `wait_start`,
            several clients given parts of one workload send it on one schedule (`replay_in_subprocess`).
    """
    nonce = prompt_nonce if prompt_nonce is not None else random.getrandbits(32)
    reqs = [copy.copy(r) for r in sorted(requests, key=lambda r: (r.arrival_s, r.request_id))]
    n = len(reqs)
    out = ReplayResult(reqs, [[] for _ in range(n)], [""] * n if keep_text else None, [None] * n, [None] * n,
                       0.0, 0.0, sent_s=[None] * n)
    scheduled = [r.arrival_s for r in reqs]
    sem = asyncio.Semaphore(concurrency)
    client = make_client(url, api_key=api_key, concurrency=concurrency, verify=verify)
    done = 0
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> None:
        nonlocal done
        try:
            await _send(client, reqs[i], i, out, speedup, model_map, nonce, send_priority)
        finally:
            sem.release()
            done += 1
            if progress is not None:
                progress(done, n)

    lag = LoopLagMonitor()
    lag.start()
    cpu0 = time.process_time()
    try:
        import anyio

        await anyio.sleep(0)  # httpx's network backend, loaded here and not in the first request's TTFT (~20 ms)
        start_at = await wait_start() if wait_start is not None else time.monotonic()
        if start_at > time.monotonic():
            await asyncio.sleep(start_at - time.monotonic())
        t0 = out.t0 = start_at
        base = base_s if base_s is not None else (reqs[0].arrival_s if reqs else 0.0)
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
        await client.aclose()
        await lag.stop()
    cpu = time.process_time() - cpu0
    out.client = {**lag.summary("client_loop_lag"),
                  "client_cpu_per_s": cpu / out.wall_s if out.wall_s > 0 else None,
                  **send_summary(out, [(a - base) for a in scheduled], speedup), "client_processes": 1}
    return out


CLIENT_LATE_MS = 20.0
"""A client whose sends or loop ran this late (p99, ms) is warned about: that much is in the TTFTs it measured."""


def auto_client_procs(cpus: int | None = None) -> int:
    """Client processes for a replay: one per 4 CPUs of this host, 1 to 4 (the rest for a server on the host)."""
    return max(1, min(4, (cpus if cpus is not None else os.cpu_count() or 1) // 4))


def client_procs_for(requested: int, own_process: bool = True, cpus: int | None = None) -> int:
    """Client processes to run: `requested`, or for 0 `auto_client_procs`; 1 for a client on the caller's own event
    loop (`own_process` False), which cannot be split."""
    if not own_process:
        return 1
    return requested or auto_client_procs(cpus)


def client_late_warning(client: dict[str, Any]) -> str | None:
    """A line for the user when the replay client itself ran late enough to show in the latencies it measured."""
    # Not `client_send_late_*`: a --max-concurrency that binds holds sends back on purpose.
    worst = max((client.get(k) or 0.0) for k in ("client_send_delay_p99_ms", "client_loop_lag_p99_ms"))
    if worst < CLIENT_LATE_MS:
        return None
    procs = int(client.get("client_processes") or 1)
    return (f"the replay client ran late: p99 {worst:.0f} ms (its sends, or its event loop), inside the TTFTs it "
            f"measured; {procs} client process(es): more (--client-procs) share the streams")


def send_summary(res: ReplayResult, scheduled_s: Sequence[float], speedup: float) -> dict[str, float | None]:
    """The client's own delays on the way in, p50 / p99 / max in ms (wall time): `client_send_late_*` from each
    request's scheduled send (`scheduled_s`, scenario seconds from time zero) to its send stamp, and
    `client_send_delay_*` from the stamp to its last byte written."""
    late, delay = [], []
    for r, at, sent in zip(res.requests, scheduled_s, res.sent_s):
        if r.error is not None and r.error.startswith("not sent"):
            continue
        late.append(max(0.0, r.arrival_s - at) / speedup)
        if sent is not None:
            delay.append((sent - r.arrival_s) / speedup)
    return {**ms_summary("client_send_late", late), **ms_summary("client_send_delay", delay)}


async def _with_end(chunks: Any) -> Any:
    """The body's reads, then None for its end."""
    async for chunk in chunks:
        yield chunk
    yield None


async def _send(client: Any, r: Request, i: int, out: ReplayResult, speedup: float,
                model_map: dict[str, str] | None, nonce: int, send_priority: bool = False) -> None:
    fields: dict[str, Any] = {
        "model": model_map.get(r.model, r.model) if model_map else r.model,
        "prompt": synthetic_prompt(r.prompt_tokens, r.request_id, r.prefix, nonce),
        "max_tokens": r.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if send_priority:
        fields["priority"] = r.priority
    body = orjson.dumps(fields)
    headers = {"content-type": "application/json", "x-slo-class": r.slo_class, "x-request-id": str(r.request_id)}
    t0 = out.t0
    start = time.monotonic()
    r.arrival_s = (start - t0) * speedup
    last = start
    tokens = 0
    parts: list[str] = []
    keep = out.texts is not None
    gaps = out.itls[i]
    parser = SSEParser()

    async def trace(event: str, info: Any) -> None:  # httpcore's events: the request's last byte is out
        if event == "http11.send_request_body.complete":
            out.sent_s[i] = (time.monotonic() - t0) * speedup

    try:
        async with client.stream("POST", COMPLETIONS, content=body, headers=headers,
                                 extensions={"trace": trace}) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                root = str(client.base_url).rstrip("/")
                r.error = (f"HTTP {resp.status_code}: {error_message(raw)}"
                           f"{status_hint(resp.status_code, root, COMPLETIONS)}")
                return
            async for chunk in _with_end(resp.aiter_bytes()):
                now = time.monotonic()
                got = 0  # events with text in this read: they share its time
                for data in (parser.feed(chunk) if chunk is not None else parser.finish()):
                    if data == b"[DONE]":
                        r.finish_s = (now - t0) * speedup
                        continue
                    try:
                        ev = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        r.error = f"bad event from the server: {data[:80]!r}"
                        continue
                    if not isinstance(ev, dict):
                        continue
                    if "error" in ev:
                        r.error = f"stream error: {error_message(data)}"
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
                        got += 1
                        if keep:
                            parts.append(text)
                if got:
                    if r.first_token_s is None:
                        # The first token's time is this read's; others in the same read came with it.
                        r.first_token_s = (now - t0) * speedup
                        gaps.extend([0.0] * (got - 1))
                    else:
                        # Events read together were sent over the gap since the last read: each gets its
                        # share of it (their timestamps interpolated), not a gap of 0 and one of the whole.
                        gaps.extend([(now - last) * speedup / got] * got)
                    last = now
        if r.finish_s is None and r.error is None:
            r.error = "stream ended without [DONE]" + (" (in the middle of an event)" if parser.pending() else "")
    except Exception as e:  # noqa: BLE001 - a failed request is reported with the run, not raised
        r.error = describe_error(e, str(client.base_url).rstrip("/"))
    finally:
        if r.error is not None:
            r.finish_s = None
        r.generated_tokens = tokens if out.usage_tokens[i] is None else out.usage_tokens[i]
        if keep:
            out.texts[i] = "".join(parts)  # type: ignore[index]


@dataclass(frozen=True)
class _ClientJob:
    """What a client process needs to run `replay` on its share of the requests (pickled to it)."""

    url: str
    requests: list[Request]
    speedup: float
    concurrency: int
    keep_text: bool
    api_key: str | None
    model_map: dict[str, str] | None = None
    send_priority: bool = False
    base_s: float | None = None
    prompt_nonce: int | None = None
    verify: bool = True


PARENT_POLL_S = 0.05
"""How often a client process looks for a stop request or a parent gone away."""

START_MARGIN_S = 0.05
"""Time zero is this long after the last client process is ready, so that each sees the start before it."""


def _client_main(job: _ClientJob, conn: Any, done: Any, stop_flag: Any, ready: Any, start: Any) -> None:
    """A client process: run the replay and send back ("ok", ReplayResult) or ("error", exception).

    `done` is a shared integer the parent reads for progress; `stop_flag` a multiprocessing Event the parent
    sets to stop sending; `ready` a semaphore this process releases once set up; `start` a shared float, the
    time zero (`time.monotonic()`) the parent sets once every process is ready (0 until then).
    """
    # Ctrl-C reaches the whole process group; the parent decides what it means (drain, then stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        msg: tuple[str, Any] = ("ok", asyncio.run(_client_replay(job, done, stop_flag, ready, start)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        msg = ("error", _portable(e))
    with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
        conn.send(msg)
    conn.close()


async def _client_replay(job: _ClientJob, done: Any, stop_flag: Any, ready: Any, start: Any) -> ReplayResult:
    stop = asyncio.Event()
    parent = multiprocessing.parent_process()

    async def wait_start() -> float:
        # Ready once the client is made (its TLS context alone takes ~0.2 s): then time zero finds it waiting.
        ready.release()
        while start.value == 0.0 and not stop_flag.is_set() and (parent is None or parent.is_alive()):
            await asyncio.sleep(0.002)
        if start.value == 0.0:  # stopped (or orphaned) before time zero: send nothing at all
            stop.set()
            return time.monotonic()
        return start.value

    async def watch() -> None:
        # A stopped or vanished parent means: send nothing more (its gateway is draining, or gone).
        while not stop_flag.is_set() and (parent is None or parent.is_alive()):
            await asyncio.sleep(PARENT_POLL_S)
        stop.set()

    def progress(finished: int, total: int) -> None:
        done.value = finished

    watcher = asyncio.create_task(watch())
    try:
        return await replay(job.url, job.requests, speedup=job.speedup, concurrency=job.concurrency,
                            progress=progress, keep_text=job.keep_text, api_key=job.api_key, stop=stop,
                            model_map=job.model_map, send_priority=job.send_priority, prompt_nonce=job.prompt_nonce,
                            wait_start=wait_start, base_s=job.base_s, verify=job.verify)
    finally:
        watcher.cancel()


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling, else a RuntimeError carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError("the replay client failed:\n" + "".join(traceback.format_exception(e)))


def _merge(parts: list[ReplayResult], shares: list[list[int]], n: int, speedup: float,
           scheduled_s: list[float]) -> ReplayResult:
    """One result from the client processes' (`shares[k]`: the places, in send order, of process k's requests)."""
    reqs: list[Any] = [None] * n
    itls: list[list[float]] = [[] for _ in range(n)]
    texts: list[str] | None = [""] * n if parts and parts[0].texts is not None else None
    usage: list[int | None] = [None] * n
    usage_prompt: list[int | None] = [None] * n
    sent: list[float | None] = [None] * n
    for part, places in zip(parts, shares):
        for j, at in enumerate(places):
            reqs[at], itls[at], usage[at] = part.requests[j], part.itls[j], part.usage_tokens[j]
            usage_prompt[at], sent[at] = part.usage_prompt_tokens[j], part.sent_s[j]
            if texts is not None and part.texts is not None:
                texts[at] = part.texts[j]
    out = ReplayResult(reqs, itls, texts, usage, usage_prompt, max(p.wall_s for p in parts), parts[0].t0,
                       sent_s=sent)
    lags = {k: max((p.client.get(k) or 0.0) for p in parts) for k in
            ("client_loop_lag_p50_ms", "client_loop_lag_p99_ms", "client_loop_lag_max_ms")}
    cpu = [p.client.get("client_cpu_per_s") for p in parts]
    out.client = {**lags, "client_cpu_per_s": sum(c for c in cpu if c is not None),
                  **send_summary(out, scheduled_s, speedup), "client_processes": len(parts)}
    return out


async def replay_in_subprocess(
    url: str,
    requests: Sequence[Request],
    *,
    speedup: float = 1.0,
    concurrency: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    keep_text: bool = False,
    api_key: str | None = None,
    stop: asyncio.Event | None = None,
    progress_interval_s: float = 0.2,
    model_map: dict[str, str] | None = None,
    send_priority: bool = False,
    processes: int = 1,
    verify: bool = True,
) -> ReplayResult:
    """`replay` run in `processes` separate (spawned) processes; same arguments and result.

    With several, the requests are dealt round-robin in send order, each process gets `concurrency` / `processes`
    of the open requests, and all send on one schedule from one time zero, set once every process is ready. One
    process's event loop reading a few hundred streams runs late by tens of ms at times, and a request sent
    meanwhile waits (inside its TTFT) and then goes out in a bunch with others: `client_loop_lag_*` and
    `client_send_*` in the result's `client` show it; more processes share that load.

    `progress` is called here, every `progress_interval_s` while the count changes. Setting `stop` stops
    the clients from sending (within `PARENT_POLL_S`). The result's `t0` is the children's time zero on
    `time.monotonic()`, the same clock as this process's: CLOCK_MONOTONIC is system-wide on Linux (and macOS),
    so `t0` still lines up with a gateway's clock in this process.

    The clients are spawned processes: they import this module afresh (and the main module, so a script
    that calls this needs the `if __name__ == "__main__":` guard).
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and a running loop
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    n = len(ordered)
    k = max(1, min(processes, n))
    base = ordered[0].arrival_s if ordered else 0.0
    nonce = random.getrandbits(32)  # one for all, so prompts that share a prefix share it across processes
    shares = [list(range(j, n, k)) for j in range(k)]
    jobs = [_ClientJob(url, [ordered[i] for i in share], speedup, max(1, concurrency // k), keep_text, api_key,
                       model_map, send_priority, base, nonce, verify) for share in shares]
    dones = [ctx.RawValue("q", 0) for _ in jobs]  # each written by its child only
    stop_flag = ctx.Event()
    ready = ctx.Semaphore(0)
    start = ctx.RawValue("d", 0.0)
    procs, readers = [], []
    for j, job in enumerate(jobs):
        reader, writer = ctx.Pipe(duplex=False)
        procs.append((ctx.Process(target=_client_main, args=(job, writer, dones[j], stop_flag, ready, start),
                                  name=f"qlmctl-replay-client-{j}", daemon=True), writer))
        readers.append(reader)
    forward = None
    if stop is not None:
        async def forward_stop() -> None:
            await stop.wait()
            stop_flag.set()

        forward = asyncio.ensure_future(forward_stop())
    started: list[Any] = []
    results: list[Any] = []
    try:
        for proc, writer in procs:
            # Off the loop: spawning writes the pickled job to the child while it starts up (~0.1-1 s).
            await asyncio.to_thread(proc.start)
            started.append(proc)
            writer.close()  # the child holds the only write end now, so its exit ends `_receive`
        results = [asyncio.ensure_future(asyncio.to_thread(_receive, r)) for r in readers]
        for _ in procs:
            while not await asyncio.to_thread(ready.acquire, True, progress_interval_s):
                if any(r.done() for r in results):  # a child died before it was ready
                    break
        start.value = time.monotonic() + START_MARGIN_S
        last = -1
        while True:
            await asyncio.wait(results, timeout=progress_interval_s)
            finished = sum(d.value for d in dones)
            if progress is not None and finished != last:
                progress(finished, n)
                last = finished
            if all(r.done() for r in results):
                break
        messages = [r.result() for r in results]
    except BaseException:
        stop_flag.set()  # cancelled while they started: let them send nothing
        for proc in started:
            if proc.is_alive():
                proc.terminate()  # interrupted here (a second Ctrl-C, a cancelled task): no orphan client
        raise
    finally:
        for proc, writer in procs:
            writer.close()
        if not results:  # no `_receive` took them over (it closes its own): a start failed or was cancelled
            for reader in readers:
                reader.close()
        if forward is not None:
            forward.cancel()
        for proc in started:
            await asyncio.to_thread(proc.join, 5.0)
    parts = []
    for proc, message in zip(started, messages):
        if message is None:
            raise RuntimeError(
                f"a replay client process exited without a result (exit code {proc.exitcode}); a script that "
                "calls this must guard its top level with `if __name__ == '__main__':` (multiprocessing's spawn "
                "re-imports it in the client)")
        kind, value = message
        if kind == "error":
            raise value
        parts.append(value)
    if k == 1:
        return parts[0]
    return _merge(parts, shares, n, speedup, [r.arrival_s - base for r in ordered])


async def replay_from_processes(url: str, requests: Sequence[Request], processes: int, **kwargs: Any) -> ReplayResult:
    """`replay` in this process when `processes` is 1, else `replay_in_subprocess` over that many (0: as many as
    `auto_client_procs` says); `kwargs` are the arguments both take."""
    processes = client_procs_for(processes)
    if processes == 1:
        return await replay(url, requests, **kwargs)
    return await replay_in_subprocess(url, requests, processes=processes, **kwargs)


def _receive(conn: Any) -> tuple[str, Any] | None:
    """The child's message, None if it sent none; closes `conn` (here: this thread may be reading it)."""
    try:
        return conn.recv()
    except EOFError:
        return None
    finally:
        conn.close()


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


def save_live(run: LiveRun, scenario: Any, out_dir: Any) -> Any:
    """Write a live run like a simulated one: `<out_dir>/<policy>/` (requests, summary, scenario, timeline)."""
    from qlmctl.report import timeline_frame, write_results

    return write_results(out_dir, run.policy, run.requests, run.summary, scenario.dump(),
                         timeline_frame(run.timeline))
