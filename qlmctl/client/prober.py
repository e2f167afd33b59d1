"""Measure a running vLLM (or vLLM-compatible) engine for `qlmctl profile-model`; `simulator.fit` fits them.

Measurements (all through the OpenAI completions API, token-id prompts so lengths are exact, greedy,
`ignore_eos`):
- prefill: one request at a time with `max_tokens=1`; its TTFT is HTTP overhead + the prefill steps;
- decode: B concurrent requests of a given prompt length, once with short and once with long outputs; the
  difference of the two rounds' last finishes over the difference in tokens is one engine step with D=B
  sequences and C=B*(context) cached tokens;
- mixed steps: B sequences decoding while prefill-only requests of L tokens are injected one at a time;
  from the engine's inter-token latency totals over a window with N injections and the pure-decode
  windows around it, one step with B decodes plus an L-token prefill (what chunked prefill runs under
  load, and where a sum of separately fitted prefill and decode costs can go wrong);
- frontend: TTFT of short probes while the server streams to many clients (the API server's own cost);
- sustained load: B sequences decoding while prompts of L tokens keep every step full (or come at a set
  rate) for many seconds; window by window, the engine's inter-token latency totals and prompt-token counter
  give the steps, their time and the tokens prefilled, and decode-only windows before and after give the same
  host's plain steps (a GPU held at its power cap runs prefill slower than in the bursts above);
- capacity: `vllm:cache_config_info{num_gpu_blocks, block_size}` from /metrics;
- optionally the sleep (level 1) and wake-up times, i.e. the warm model-swap cost.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from qlmctl.client.http import SSEParser, error_message, server_url
from qlmctl.client.loadproc import LoadStreams, drain_stream
from qlmctl.engines.base import EngineTotals
from qlmctl.engines.totals import engine_totals_delta, parse_engine_totals
from qlmctl.engines.vllm import parse_vllm_metrics
from simulator.fit import (DecodePoint, FrontendLoadPoint, FrontendPoint, MixedPoint, PrefillPoint, RawProfile,
                          SustainedWindow)

def sustained_inflight(budget: int, prompt_length: int) -> int:
    """Prompts a saturating sustained run keeps in flight: three steps' worth, so that every step is full however
    late the client reads."""
    return max(1, -(-budget // prompt_length)) * 3


ITL_HISTOGRAM = "vllm:inter_token_latency_seconds"

PROMPT_TOKEN_LOW = 1000
PROMPT_TOKEN_HIGH = 30000


def _load_point(streams: int, probes: int, probe_tokens: int, elapsed: float, client_ttft: float,
                before: EngineTotals, after: EngineTotals, probe_out: int = 1,
                probe_words: bool = False, window_s: float | None = None, usage_chunks: bool = False
                ) -> FrontendLoadPoint:
    """A FrontendLoadPoint from the /metrics totals around its window."""
    d = engine_totals_delta(before, after)

    def mean(name: str) -> float | None:
        return d[name]["mean"] if name in d else None

    itl = d.get(ITL_HISTOGRAM, {"sum": 0.0, "count": 0.0})
    cpu = d.get("process_cpu_seconds")
    queue, prefill = mean("vllm:request_queue_time_seconds"), mean("vllm:request_prefill_time_seconds")
    return FrontendLoadPoint(
        streams=streams, rate_rps=probes / elapsed, probes=probes, probe_tokens=probe_tokens,
        step_s=itl["sum"] / itl["count"] if itl["count"] > 0 else 0.0, tokens_per_s=itl["count"] / elapsed,
        client_ttft_s=client_ttft, cpu_per_s=cpu / elapsed if cpu is not None else None,
        vllm_ttft_s=mean("vllm:time_to_first_token_seconds"),
        engine_s=queue + prefill if queue is not None and prefill is not None else None, probe_out=probe_out,
        probe_words=probe_words, window_s=window_s, usage_chunks=usage_chunks)


def decode_rounds(batch: int, prompt_tokens: int, output_tokens: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """The output lengths of `Profiler.decode_point`'s short and long rounds."""
    # Chunked prefill staggers the starts by about this many steps; the short round must outlast it so that every
    # sequence decodes together in both rounds.
    stagger = -(-batch * prompt_tokens // max(1, max_num_batched_tokens - batch))
    short = max(4, 2 * stagger + 4)
    return short, short + output_tokens


class _DecodersDone(Exception):
    """The long requests of a mixed-step measurement finished before its windows did."""


class Profiler:
    """Runs the measurements against one engine URL (async httpx)."""

    def __init__(self, url: str, model: str, seed: int = 0, timeout_s: float = 600.0, api_key: str | None = None,
                 verify: bool = True) -> None:
        import httpx

        self.url = server_url(url)
        self.model = model
        self._client_kw: dict = {"timeout_s": timeout_s, "api_key": api_key, "verify": verify}
        """What a process of its own needs to reach the same server (`LoadStreams`)."""
        self.rng = np.random.default_rng(seed)
        self.skipped: list[str] = []
        """Points measured but not kept, with the reason."""
        # Keep-alive shorter than uvicorn's 5 s idle timeout, so a reused connection is never one the
        # server is closing (that race surfaces as ReadError under hundreds of concurrent requests).
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, verify=verify,
                                        headers={"authorization": f"Bearer {api_key}"} if api_key else {},
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024,
                                                            keepalive_expiry=1.0))

    async def close(self) -> None:
        await self.client.aclose()

    def _prompt(self, n: int) -> list[int]:
        return self.rng.integers(PROMPT_TOKEN_LOW, PROMPT_TOKEN_HIGH, size=n).tolist()

    async def stream(self, prompt_tokens: int, max_tokens: int, text: bool = False,
                     first_only: bool = False) -> tuple[float, list[float]]:
        """One streamed completion: (TTFT s, token arrival times relative to send). `text`: the prompt as words
        ("w<id>", one token each with the synthetic tokenizer) for the server to tokenize, and the usage chunk
        asked for at the end, as a replay sends it, instead of token ids. `first_only`: after the first token the
        rest of the answer is read but not parsed (this client stays light; the times hold the first only)."""
        ids = self._prompt(prompt_tokens)
        prompt = " ".join(f"w{t}" for t in ids) if text else ids
        body: dict = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                      "ignore_eos": True, "stream": True}
        if text:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        times: list[float] = []
        parser = SSEParser()
        async with self.client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"engine answered {resp.status_code}: {error_message(await resp.aread())}")
            async for data in resp.aiter_bytes():
                now = time.perf_counter() - t0
                if first_only and times:
                    continue
                for event in parser.feed(data):
                    if event == b"[DONE]":
                        continue
                    choices = json.loads(event).get("choices") or []
                    # A token can decode to no text (random ids): the chunk that ends the stream still counts.
                    if choices and (choices[0].get("text") or (choices[0].get("finish_reason") and not times)):
                        # vLLM may pack several tokens in one chunk when the client lags; count words.
                        n = max(1, len((choices[0].get("text") or "").split()))
                        times.extend([now] * n)
        if not times:
            raise RuntimeError("no tokens streamed")
        return times[0], times

    async def prefill_point(self, prompt_tokens: int, reps: int) -> PrefillPoint:
        name = "vllm:request_prefill_time_seconds"
        ttfts: list[float] = []
        engine: list[float] = []
        for _ in range(reps):
            before = await self._totals((name,))
            ttft, _ = await self.stream(prompt_tokens, 1)
            ttfts.append(ttft)
            h0 = before.histograms.get(name) if before is not None else None
            # The engine may record the request's stats just after its last chunk: wait for them briefly.
            for _ in range(25):
                after = await self._totals((name,))
                h1 = after.histograms.get(name) if after is not None else None
                if h0 is None or h1 is None or h1.count > h0.count:
                    break
                await asyncio.sleep(0.02)
            if h0 is not None and h1 is not None and h1.count == h0.count + 1:
                engine.append(h1.sum - h0.sum)
        return PrefillPoint(prompt_tokens, float(statistics.median(ttfts)),
                            float(statistics.median(engine)) if len(engine) == reps else None)

    async def complete(self, prompt_tokens: int, max_tokens: int) -> float:
        """One non-streamed completion; its end-to-end latency, s."""
        body = {"model": self.model, "prompt": self._prompt(prompt_tokens), "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        import httpx

        for attempt in range(3):
            t0 = time.perf_counter()
            try:
                resp = await self.client.post("/v1/completions", json=body)
                break
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError):
                if attempt == 2:
                    raise
        if resp.status_code != 200:
            raise RuntimeError(f"engine answered {resp.status_code}: {resp.text[:300]}")
        n = resp.json()["usage"]["completion_tokens"]
        if n != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {n}")
        return time.perf_counter() - t0

    async def decode_point(self, batch: int, prompt_tokens: int, output_tokens: int,
                           max_num_batched_tokens: int = 8192) -> DecodePoint:
        """Step time with `batch` sequences decoding: two rounds of `batch` concurrent requests, with short
        and long outputs; the long round's extra tokens are all full-batch decode steps. Timed by the engine
        itself (its inter-token latency histogram, sum and count, before and after each round), so a busy
        client cannot skew it; without that metric, by the difference of the rounds' last finishes."""
        short, long = decode_rounds(batch, prompt_tokens, output_tokens, max_num_batched_tokens)
        rounds = []
        server: list[tuple[float, float]] = []
        for n in (short, long):
            before = await self.itl_totals()
            e2e = await asyncio.gather(*(self.complete(prompt_tokens, n) for _ in range(batch)))
            after = await self.itl_totals()
            rounds.append(max(e2e))
            if before is not None and after is not None:
                server.append((after[0] - before[0], after[1] - before[1]))
        if len(server) == 2 and server[1][1] > server[0][1]:
            # The engine's own inter-token latencies: the long round's extra tokens are full-batch steps.
            itl = (server[1][0] - server[0][0]) / (server[1][1] - server[0][1])
        else:
            itl = (rounds[1] - rounds[0]) / (long - short)
        if itl <= 0:
            raise RuntimeError(f"decode timing at batch {batch} is not increasing with output length")
        mid_gen = (short + long) / 2.0
        return DecodePoint(batch, prompt_tokens, output_tokens, float(itl), batch * (prompt_tokens + mid_gen))

    async def mixed_points(self, batch: int, prompt_tokens: int, lengths: list[int], *, inject: int = 8,
                           window_s: float = 0.5, max_tokens: int = 2000) -> list[MixedPoint]:
        """Steps mixing `batch` decodes with one prefill of each length in `lengths` (see module docstring).

        `batch` long requests decode throughout; each window injects `inject` prefill-only requests
        (max_tokens=1) one after another, between pure-decode windows. Over a window the engine's ITL
        totals give the steps taken (K = count / batch) and their total time (sum / batch); K - inject
        of them are pure decodes, timed by the windows around it, and the rest is the mixed steps."""
        start = await self.itl_totals()
        if start is None:
            raise RuntimeError("mixed-step timing needs the engine's vllm:inter_token_latency_seconds")
        prompted = await self.counter("vllm:prompt_tokens")
        decoders = [asyncio.create_task(self.complete(prompt_tokens, max_tokens)) for _ in range(batch)]
        points: list[MixedPoint] = []
        try:
            # Every decoder must be through its prefill (chunked prefill staggers them over many steps)
            # before a window counts as pure decode: wait for the engine's prompt-token counter.
            await self._wait_prefilled(prompted, batch * prompt_tokens)
            await asyncio.sleep(max(0.3, 2 * window_s))

            async def window(length: int | None) -> tuple[float, float, float]:
                before = await self.itl_totals()
                if length is None:
                    await asyncio.sleep(window_s)
                else:
                    for _ in range(inject):
                        await self.stream(length, 1)
                after = await self.itl_totals()
                assert before is not None and after is not None
                if any(d.done() for d in decoders):
                    raise _DecodersDone
                steps_mid = ((before[1] + after[1]) / 2 - start[1]) / batch
                return after[0] - before[0], after[1] - before[1], steps_mid

            current: int | None = None
            try:
                dsum, dcount, _ = await window(None)
                for length in lengths:
                    current = length
                    isum, icount, steps_mid = await window(length)
                    psum, pcount, _ = await window(None)
                    before, after = dsum / dcount, psum / pcount
                    if abs(after - before) > 0.15 * before:
                        # The decode batch changed under the window (a straggling prefill, a preemption).
                        self.skipped.append(f"mixed B={batch} ctx={prompt_tokens} L={length}: decode step "
                                            f"{before * 1e3:.2f} ms before, {after * 1e3:.2f} ms after")
                        dsum, dcount = psum, pcount
                        continue
                    t_dec = (dsum + psum) / (dcount + pcount)
                    steps = icount / batch
                    mixed = (isum / batch - (steps - inject) * t_dec) / inject
                    ctx = batch * (prompt_tokens + steps_mid)
                    points.append(MixedPoint(batch, prompt_tokens, length, float(mixed), float(t_dec), float(ctx)))
                    dsum, dcount = psum, pcount
            except _DecodersDone:
                # Their output length is what the KV cache holds for this batch (`max_tokens`); on a faster GPU
                # the steps run out before the windows do. Keep what was measured; say what was not.
                self.skipped.append(f"mixed B={batch} ctx={prompt_tokens}: the decoders finished their {max_tokens} "
                                    f"tokens before the windows " + (f"from L={current} on" if current else "began"))
        finally:
            await self._stop(decoders)
        return points

    async def frontend_point(self, streams: int, prompt_tokens: int, probe_tokens: int = 128, probes: int = 20,
                             max_tokens: int = 2000) -> FrontendPoint:
        """TTFT of short probes while the server streams `streams` decodes to clients.

        A server process that relays hundreds of streams (detokenising, formatting each chunk) is slower to
        take in a new request and to hand back its first token; the probes time that against the engine's
        own step (`vllm:inter_token_latency_seconds`). The streams are read raw (not parsed) so the client
        here stays light."""
        prompted = await self.counter("vllm:prompt_tokens")
        loads = [asyncio.create_task(self._raw_stream(prompt_tokens, max_tokens)) for _ in range(streams)]
        try:
            await self._wait_prefilled(prompted, streams * prompt_tokens)
            await asyncio.sleep(0.5)
            before = await self.itl_totals()
            ttfts = []
            for _ in range(probes):
                ttft, _ = await self.stream(probe_tokens, 1)
                ttfts.append(ttft)
                await asyncio.sleep(float(self.rng.uniform(0.0, 0.02)))  # land at random points of a step
            after = await self.itl_totals()
            for t in loads:
                if t.done():
                    err = t.exception()
                    raise RuntimeError(f"a load stream ended early with {streams} streams: {err or 'finished'}")
        finally:
            await self._stop(loads)
        step = 0.0
        if before is not None and after is not None and after[1] > before[1]:
            step = (after[0] - before[0]) / (after[1] - before[1])
        return FrontendPoint(streams, float(step), float(statistics.median(ttfts)), probe_tokens)

    async def frontend_load_points(self, streams: int, rates: list[float], probe_tokens: int = 1024,
                                   prompt_tokens: int = 512, window_s: float = 5.0,
                                   max_tokens: int = 2000,
                                   kinds: tuple[tuple[int, bool], ...] = ((1, False),),
                                   usage_chunks: bool = False) -> list[FrontendLoadPoint]:
        """Windows of probes (requests of `probe_tokens`, Poisson arrivals at each of `rates`) while the server
        streams `streams` decodes to clients, as a trace's requests meet it; for each of `kinds` of probes in turn,
        (tokens asked for, prompt as words): (1, False) a prefill-only probe of token ids, (32, True) a request as a
        trace's are, words for the API server to tokenize and a streamed answer to relay and close.

        The load streams are read by another process (`LoadStreams`): read here, they would delay this client's
        probes by its own event loop's lag, which the fit would book to the API server (10-14 ms at 128 streams
        on an H100 host).

        Over each window: the API server's CPU seconds (`process_cpu_seconds_total`, which vLLM's /metrics
        exports for its API server process), the tokens streamed and the engine's step (inter-token latency
        totals), and the probes' TTFT as this client and as vLLM's histograms see it. The load streams were
        admitted before the first window, so the request-level histograms' deltas are the probes' alone.
        `usage_chunks`: the load streams ask for the usage so far in every chunk (what that costs the API server)."""
        names = ("vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", ITL_HISTOGRAM)
        prompted = await self.counter("vllm:prompt_tokens")
        held = LoadStreams(str(self.url), self.model, [self._prompt(prompt_tokens) for _ in range(streams)],
                           max_tokens, usage_chunks=usage_chunks, **self._client_kw)
        if streams:
            held.start()
        points: list[FrontendLoadPoint] = []
        try:
            await self._wait_prefilled(prompted, streams * prompt_tokens, alive=held.check)
            await asyncio.sleep(0.5)
            for (probe_out, probe_words), rate in ((k, r) for k in kinds for r in rates):
                ttfts, before, after, elapsed = await self.probe_window(
                    rate, window_s, probe_tokens, names, ("process_cpu_seconds",), probe_out=probe_out,
                    text=probe_words)
                held.check()
                if not ttfts or before is None or after is None:
                    continue
                points.append(_load_point(streams, len(ttfts), probe_tokens, elapsed, float(np.mean(ttfts)), before,
                                          after, probe_out=probe_out, probe_words=probe_words,
                                          window_s=window_s, usage_chunks=usage_chunks))
        finally:
            await held.stop()  # its connections close: the engine aborts the streams
            await self.wait_idle()
        return points

    async def probe_window(self, rate: float, window_s: float, probe_tokens: int, histograms: tuple[str, ...],
                           counters: tuple[str, ...], probe_out: int = 1, text: bool = False
                           ) -> tuple[list[float], EngineTotals | None, EngineTotals | None, float]:
        """One window of probes (`probe_tokens` prompts asking for `probe_out` tokens, Poisson arrivals at `rate`
        for `window_s`): (their TTFTs, the engine's totals of `histograms` and `counters` before and after, the
        seconds from the first totals read to the last), all probes answered."""
        before = await self._totals(histograms, counters)
        t0 = time.perf_counter()
        probes: list[asyncio.Task] = []
        t_next = float(self.rng.exponential(1.0 / rate))
        while t_next < window_s:
            await asyncio.sleep(max(0.0, t0 + t_next - time.perf_counter()))
            probes.append(asyncio.create_task(self.stream(probe_tokens, probe_out, text=text, first_only=True)))
            t_next += float(self.rng.exponential(1.0 / rate))
        ttfts = [t for t, _ in await asyncio.gather(*probes)]
        after = await self._totals(histograms, counters)
        return ttfts, before, after, time.perf_counter() - t0

    async def sustained_run(self, run: int, decoders: int, prompt_length: int, seconds: float, *,
                            rate_rps: float | None = None, context: int = 128, decode_tokens: int = 4000,
                            budget: int = 8192, window_s: float = 1.0) -> list[SustainedWindow]:
        """`decoders` streams decode throughout while prompts of `prompt_length` tokens (max_tokens=1) come for
        `seconds`: at `rate_rps`, evenly spaced, or (None) as many at once as keep every step full. The windows:
        one decode-only second before, one every `window_s` of the load, one decode-only second after."""
        await self.wait_idle()
        senders: set[asyncio.Task] = set()
        out: list[SustainedWindow] = []

        async def sample() -> tuple[float, float, float]:
            # One scrape for both, so that the steps and the tokens of a window are read at the same moment.
            totals = await self._totals(histograms=(ITL_HISTOGRAM,), counters=("vllm:prompt_tokens",))
            itl = totals.histograms.get(ITL_HISTOGRAM) if totals is not None else None
            pt = totals.counters.get("vllm:prompt_tokens") if totals is not None else None
            if itl is None or pt is None:
                raise RuntimeError("the engine exports no inter-token latency histogram or prompt-token counter")
            return itl.sum, itl.count, pt

        start = await sample()  # the decoders' tokens are counted from here: their context at each window
        tasks = [asyncio.create_task(self.complete(context, decode_tokens)) for _ in range(decoders)]

        def window(kind: str, index: int, a: tuple, z: tuple, rate: float | None) -> None:
            steps = (z[1] - a[1]) / decoders
            before = (a[1] - start[1]) / decoders
            out.append(SustainedWindow(run, kind, index, decoders, prompt_length, rate, steps,
                                       (z[0] - a[0]) / decoders, z[2] - a[2], context + 1 + before + steps / 2))

        def send() -> None:
            task = asyncio.create_task(self.stream(prompt_length, 1))
            senders.add(task)
            task.add_done_callback(senders.discard)

        try:
            await asyncio.sleep(1.0)
            await self.wait_requests(lambda running, waiting: running >= decoders and waiting == 0)
            a = await sample()
            await asyncio.sleep(1.0)
            z = await sample()
            window("decode", -1, a, z, None)
            t_end = time.perf_counter() + seconds
            inflight = sustained_inflight(budget, prompt_length)

            async def inject() -> None:
                nxt = time.perf_counter()
                while time.perf_counter() < t_end:
                    if rate_rps is None:
                        while len(senders) < inflight:
                            send()
                        await asyncio.sleep(0.005)
                    else:
                        send()
                        nxt += 1.0 / rate_rps
                        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

            injector = asyncio.create_task(inject())
            a, i = await sample(), 0
            while time.perf_counter() < t_end:
                await asyncio.sleep(window_s)
                z = await sample()
                window("load", i, a, z, rate_rps)
                a, i = z, i + 1
            await injector
            await asyncio.gather(*list(senders), return_exceptions=True)
            a = await sample()
            await asyncio.sleep(1.0)
            z = await sample()
            window("decode", 1 << 30, a, z, None)
            if any(t.done() for t in tasks):
                raise RuntimeError("the decoders finished before the sustained run did (too few decode tokens)")
        finally:
            await self._stop(tasks + list(senders))
        return out

    async def _stop(self, tasks: list[asyncio.Task]) -> None:
        """Cancel the load requests (the engine aborts them) and wait until the engine is idle again."""
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.wait_idle()

    async def _raw_stream(self, prompt_tokens: int, max_tokens: int) -> None:
        """A streamed completion whose bytes are read and dropped (load, not measurement)."""
        await drain_stream(self.client, self.model, self._prompt(prompt_tokens), max_tokens)

    async def _wait_prefilled(self, start: float | None, tokens: int, timeout_s: float = 120.0,
                              alive: Callable[[], None] | None = None) -> None:
        """Wait until the engine's prompt-token counter has grown by `tokens` since `start` (if it has one);
        `alive()` raises if what sends them has failed."""
        if start is None or tokens <= 0:
            return
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if alive is not None:
                alive()
            now = await self.counter("vllm:prompt_tokens")
            if now is not None and now - start >= tokens:
                return
            await asyncio.sleep(0.05)

    async def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until the engine reports no running or waiting request (after aborting the decoders)."""
        await self.wait_requests(lambda running, waiting: running + waiting == 0, timeout_s)

    async def wait_requests(self, done, timeout_s: float = 30.0) -> None:
        """Wait until `done(running, waiting)` holds for the engine's request gauges (or `timeout_s` passes)."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            resp = await self.client.get("/metrics")
            m = parse_vllm_metrics(resp.text)
            if done(m.num_requests_running, m.num_requests_waiting):
                return
            await asyncio.sleep(0.2)

    async def _totals(self, histograms: tuple[str, ...] = (), counters: tuple[str, ...] = ()) -> EngineTotals | None:
        """Those histograms and counters of the engine's /metrics, summed over labels (None without a page)."""
        resp = await self.client.get("/metrics")
        if resp.status_code != 200:
            return None
        return parse_engine_totals(resp.text, histograms, counters)

    async def counter(self, name: str) -> float | None:
        """A counter of the engine's /metrics (summed over labels; `_total` suffix optional), if present."""
        base = name.removesuffix("_total")
        totals = await self._totals(counters=(base,))
        return totals.counters.get(base) if totals is not None else None

    async def itl_totals(self) -> tuple[float, float] | None:
        """(sum s, count) of the engine's `vllm:inter_token_latency_seconds` histogram, if it has one."""
        totals = await self._totals(histograms=(ITL_HISTOGRAM,))
        h = totals.histograms.get(ITL_HISTOGRAM) if totals is not None else None
        return (h.sum, h.count) if h is not None else None

    async def capacity(self, raw: RawProfile) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        resp = await self.client.get("/metrics")
        if resp.status_code == 200:
            for fam in text_string_to_metric_families(resp.text):
                if fam.name in ("vllm:cache_config_info", "vllm:cache_config"):
                    for s in fam.samples:
                        nb = s.labels.get("num_gpu_blocks")
                        if nb and nb != "None":
                            raw.num_gpu_blocks = int(nb)
                        bs = s.labels.get("block_size")
                        if bs and bs != "None":
                            raw.block_size = int(bs)
        resp = await self.client.get("/v1/models")
        if resp.status_code == 200:
            for m in resp.json().get("data", []):
                if m.get("id") == self.model and m.get("max_model_len"):
                    raw.max_model_len = int(m["max_model_len"])
        resp = await self.client.get("/version")
        if resp.status_code == 200:
            raw.engine_version = f"vllm {resp.json().get('version', '?')}"

    async def sleep_wake(self, raw: RawProfile) -> None:
        t0 = time.perf_counter()
        r = await self.client.post("/sleep", params={"level": 1})
        if r.status_code >= 400:
            raise RuntimeError(f"/sleep answered {r.status_code}: is the engine in sleep mode with VLLM_SERVER_DEV_MODE=1?")
        raw.sleep_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = await self.client.post("/wake_up")
        if r.status_code >= 400:
            raise RuntimeError(f"/wake_up answered {r.status_code}")
        raw.wake_s = time.perf_counter() - t0
