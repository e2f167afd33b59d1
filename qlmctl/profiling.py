"""Measure a running vLLM (or vLLM-compatible) engine and fit the simulator's step-time model.

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
- capacity: `vllm:cache_config_info{num_gpu_blocks, block_size}` from /metrics;
- optionally the sleep (level 1) and wake-up times, i.e. the warm model-swap cost.

The fit is a non-negative least squares on relative error over every point (A = attention pairs):
    decode point:  itl  = base + b*D + c*C
    prefill point: ttft = overhead + ceil(L/budget)*base + a*L + q*A(L)
    mixed point:   step = base + a*L + q*A(L) + b*D + c*C
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from simulator.profile import chunk_pairs, prompt_pairs

PROMPT_TOKEN_LOW = 1000
PROMPT_TOKEN_HIGH = 30000


@dataclass
class PrefillPoint:
    prompt_tokens: int
    ttft_s: float


@dataclass
class DecodePoint:
    batch: int
    prompt_tokens: int
    output_tokens: int
    itl_s: float
    """Step time with every sequence decoding (from two rounds of different output lengths)."""
    context_tokens: float
    """Mean KV tokens of the whole batch during that part."""


@dataclass
class MixedPoint:
    batch: int
    prompt_tokens: int
    """Prompt length of each decoding sequence."""
    prefill_tokens: int
    """Tokens of the prefill that shares the step with the decodes."""
    step_s: float
    """Time of one step with `batch` decodes and the prefill."""
    decode_step_s: float
    """Time of the pure-decode steps around it (same batch)."""
    context_tokens: float
    """KV tokens of the decoding sequences during the window."""


@dataclass
class RawProfile:
    """Everything measured, kept so fitting can be redone off the GPU."""

    model: str
    url: str
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    mixed: list[MixedPoint] = field(default_factory=list)
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    max_model_len: int | None = None
    sleep_s: float | None = None
    wake_s: float | None = None
    launch_s: float | None = None
    """Launch to /health of the engine (a cold model load), when profile-model started it."""
    async_scheduling: bool | None = None
    """Whether the engine schedules a step ahead (recorded from the command line; not visible over HTTP)."""
    engine_version: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RawProfile":
        d = json.loads(text)
        d["prefill"] = [PrefillPoint(**p) for p in d.get("prefill", [])]
        d["decode"] = [DecodePoint(**p) for p in d.get("decode", [])]
        d["mixed"] = [MixedPoint(**p) for p in d.get("mixed", [])]
        return cls(**d)


@dataclass
class Fit:
    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_prefill_pair_s: float
    overhead_s: float
    errors: list[tuple[str, float, float, float]]
    """(point label, measured s, fitted s, relative error)."""

    @property
    def mean_abs_error(self) -> float:
        return float(np.mean([abs(e[3]) for e in self.errors])) if self.errors else 0.0

    @property
    def max_abs_error(self) -> float:
        return float(max(abs(e[3]) for e in self.errors)) if self.errors else 0.0


def fit_profile(raw: RawProfile, max_num_batched_tokens: int, quadratic: bool = True) -> Fit:
    """Fit the step-time coefficients to the raw measurements (see module docstring).

    `quadratic=False` leaves out the prefill-attention term (the older, purely linear model)."""
    from scipy.optimize import nnls

    rows: list[list[float]] = []
    ys: list[float] = []
    labels: list[str] = []
    # Columns: base, a (prefill/token), b (decode/seq), c (context/token), q (prefill pair), overhead.
    for p in raw.decode:
        rows.append([1.0, 0.0, float(p.batch), float(p.context_tokens), 0.0, 0.0])
        ys.append(p.itl_s)
        labels.append(f"decode B={p.batch} ctx={p.prompt_tokens}")
    for p in raw.prefill:
        chunks = math.ceil(p.prompt_tokens / max_num_batched_tokens)
        pairs = prompt_pairs(p.prompt_tokens, max_num_batched_tokens)
        rows.append([float(chunks), float(p.prompt_tokens), 0.0, 0.0, pairs, 1.0])
        ys.append(p.ttft_s)
        labels.append(f"prefill L={p.prompt_tokens}")
    for p in raw.mixed:
        rows.append([1.0, float(p.prefill_tokens), float(p.batch), float(p.context_tokens),
                     chunk_pairs(0, p.prefill_tokens), 0.0])
        ys.append(p.step_s)
        labels.append(f"mixed B={p.batch} L={p.prefill_tokens}")
    cols = 6 if quadratic else 5
    if not quadratic:
        rows = [r[:4] + r[5:] for r in rows]
    if len(rows) < cols:
        raise ValueError(f"too few measurements to fit {cols} coefficients")
    a = np.array(rows)
    y = np.array(ys)
    w = 1.0 / y  # relative error
    # Scale columns so that NNLS is well conditioned.
    scale = np.maximum(np.abs(a * w[:, None]).max(axis=0), 1e-30)
    coef, _ = nnls((a * w[:, None]) / scale, y * w)
    coef = coef / scale
    pred = a @ coef
    if not quadratic:
        coef = np.concatenate([coef[:4], [0.0], coef[4:]])
    errors = [(lab, float(m), float(f), float((f - m) / m)) for lab, m, f in zip(labels, y, pred)]
    return Fit(
        base_s=float(coef[0]),
        per_prefill_token_s=float(coef[1]),
        per_decode_seq_s=float(coef[2]),
        per_context_token_s=float(coef[3]),
        per_prefill_pair_s=float(coef[4]),
        overhead_s=float(coef[5]),
        errors=errors,
    )


def profile_dict(raw: RawProfile, fit: Fit, *, max_num_seqs: int, max_num_batched_tokens: int,
                 gpu: str, flags: str, kv_blocks: int | None = None) -> dict[str, Any]:
    """The profile as a scenario `profile_file` (ProfileSpec fields + provenance)."""
    blocks = kv_blocks or raw.num_gpu_blocks
    if not blocks:
        raise ValueError("KV capacity unknown: the engine did not report vllm:cache_config_info; pass --kv-blocks")
    out: dict[str, Any] = {
        "base_s": round(fit.base_s, 7),
        "per_prefill_token_s": float(f"{fit.per_prefill_token_s:.4g}"),
        "per_decode_seq_s": float(f"{fit.per_decode_seq_s:.4g}"),
        "per_context_token_s": float(f"{fit.per_context_token_s:.4g}"),
        "per_prefill_pair_s": float(f"{fit.per_prefill_pair_s:.4g}"),
        "kv_blocks": int(blocks),
        "block_size": int(raw.block_size or 16),
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
    }
    out["frontend_latency_s"] = round(fit.overhead_s, 6)
    if raw.max_model_len:
        out["max_model_len"] = int(raw.max_model_len)
    if raw.async_scheduling is not None:
        out["async_scheduling"] = raw.async_scheduling
    if raw.launch_s is not None:
        out["load_cold_s"] = round(raw.launch_s, 1)
    if raw.wake_s is not None:
        out["load_warm_s"] = round(raw.wake_s, 3)
    out["provenance"] = {
        "tool": "qlmctl profile-model",
        "engine": raw.engine_version or "unknown",
        "model": raw.model,
        "gpu": gpu,
        "flags": flags,
        "date": time.strftime("%Y-%m-%d"),
        "http_overhead_s": round(fit.overhead_s, 6),
        "fit_mean_abs_rel_error": round(fit.mean_abs_error, 4),
        "fit_max_abs_rel_error": round(fit.max_abs_error, 4),
        "sleep_s": raw.sleep_s,
        "points": {"prefill": len(raw.prefill), "decode": len(raw.decode), "mixed": len(raw.mixed)},
    }
    return out


# --------------------------------------------------------------------------- measuring
class Profiler:
    """Runs the measurements against one engine URL (async httpx)."""

    def __init__(self, url: str, model: str, seed: int = 0, timeout_s: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.rng = np.random.default_rng(seed)
        # Keep-alive shorter than uvicorn's 5 s idle timeout, so a reused connection is never one the
        # server is closing (that race surfaces as ReadError under hundreds of concurrent requests).
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s,
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024,
                                                            keepalive_expiry=1.0))

    async def close(self) -> None:
        await self.client.aclose()

    def _prompt(self, n: int) -> list[int]:
        return self.rng.integers(PROMPT_TOKEN_LOW, PROMPT_TOKEN_HIGH, size=n).tolist()

    async def stream(self, prompt_tokens: int, max_tokens: int) -> tuple[float, list[float]]:
        """One streamed completion: (TTFT s, token arrival times relative to send)."""
        body = {"model": self.model, "prompt": self._prompt(prompt_tokens), "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        t0 = time.perf_counter()
        times: list[float] = []
        async with self.client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"engine answered {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter() - t0
                    # vLLM may pack several tokens in one chunk when the client lags; count words.
                    n = max(1, len(choices[0]["text"].split()))
                    times.extend([now] * n)
        if not times:
            raise RuntimeError("no tokens streamed")
        return times[0], times

    async def prefill_point(self, prompt_tokens: int, reps: int) -> PrefillPoint:
        ttfts = []
        for _ in range(reps):
            ttft, _ = await self.stream(prompt_tokens, 1)
            ttfts.append(ttft)
        return PrefillPoint(prompt_tokens, float(statistics.median(ttfts)))

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
        # Chunked prefill staggers the starts by about this many steps; the short round must outlast it so
        # that every sequence decodes together in both rounds.
        stagger = -(-batch * prompt_tokens // max(1, max_num_batched_tokens - batch))
        short = max(4, 2 * stagger + 4)
        long = short + output_tokens
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
        if await self.itl_totals() is None:
            raise RuntimeError("mixed-step timing needs the engine's vllm:inter_token_latency_seconds")
        start = await self.itl_totals()
        decoders = [asyncio.create_task(self.complete(prompt_tokens, max_tokens)) for _ in range(batch)]
        points: list[MixedPoint] = []
        try:
            # Let every decoder get through its prefill (chunked prefill staggers them).
            await asyncio.sleep(max(0.3, 4 * window_s))

            async def window(length: int | None) -> tuple[float, float, float]:
                before = await self.itl_totals()
                if length is None:
                    await asyncio.sleep(window_s)
                else:
                    for _ in range(inject):
                        await self.stream(length, 1)
                after = await self.itl_totals()
                assert before is not None and after is not None and start is not None
                if any(d.done() for d in decoders):
                    raise RuntimeError(f"decoders finished early at batch {batch}: raise max_tokens")
                steps_mid = ((before[1] + after[1]) / 2 - start[1]) / batch
                return after[0] - before[0], after[1] - before[1], steps_mid

            pure_before = window(None)
            dsum, dcount, _ = await pure_before
            for length in lengths:
                isum, icount, steps_mid = await window(length)
                psum, pcount, _ = await window(None)
                t_dec = (dsum + psum) / (dcount + pcount)
                steps = icount / batch
                mixed = (isum / batch - (steps - inject) * t_dec) / inject
                ctx = batch * (prompt_tokens + steps_mid)
                points.append(MixedPoint(batch, prompt_tokens, length, float(mixed), float(t_dec), float(ctx)))
                dsum, dcount = psum, pcount
        finally:
            for d in decoders:
                d.cancel()
            await asyncio.gather(*decoders, return_exceptions=True)
            await self.wait_idle()
        return points

    async def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until the engine reports no running or waiting request (after aborting the decoders)."""
        from qlmctl.live.prom import parse_vllm_metrics

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            resp = await self.client.get("/metrics")
            m = parse_vllm_metrics(resp.text)
            if m.num_requests_running + m.num_requests_waiting == 0:
                return
            await asyncio.sleep(0.2)

    async def itl_totals(self) -> tuple[float, float] | None:
        """(sum s, count) of the engine's `vllm:inter_token_latency_seconds` histogram, if it has one."""
        from prometheus_client.parser import text_string_to_metric_families

        resp = await self.client.get("/metrics")
        if resp.status_code != 200:
            return None
        total = count = None
        for fam in text_string_to_metric_families(resp.text):
            if fam.name == "vllm:inter_token_latency_seconds":
                for smp in fam.samples:
                    if smp.name.endswith("_sum"):
                        total = (total or 0.0) + smp.value
                    elif smp.name.endswith("_count"):
                        count = (count or 0.0) + smp.value
        return (total, count) if total is not None and count is not None else None

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
