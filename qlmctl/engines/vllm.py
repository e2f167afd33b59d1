"""vLLM as an engine server: its OpenAI-compatible API, its /metrics, its sleep mode, how to launch it.

A vLLM server's /metrics page is large (tens of KB of histograms) and is polled every half second per
engine, so `parse_vllm_metrics` scans it line by line for the few series the gateway needs rather than
parsing it in full (the full parser would stall the event loop). Sleep mode (POST /sleep, /wake_up,
GET /is_sleeping) is only served with VLLM_SERVER_DEV_MODE=1, and needs `--enable-sleep-mode`.
"""

from __future__ import annotations

import asyncio
import re

import orjson

from qlmctl.engines.base import EngineError, EngineKind, EngineMetrics, EngineTotals
from qlmctl.engines.openai import OpenAIServer
from qlmctl.engines.totals import parse_engine_totals

RUN_HISTOGRAMS: tuple[str, ...] = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:iteration_tokens_total",
)
"""vLLM histograms whose change over a live run `run_live` reports (the engine's latency decomposition)."""
RUN_COUNTERS: tuple[str, ...] = ("vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens",
                                  "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "process_cpu_seconds")
"""vLLM counters whose change over a live run `run_live` reports (names without `_total`); `process_cpu_seconds`
is the API server process's CPU time (the profile's API-server model charges it per request and per token)."""

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Pick vLLM's scheduler gauges and cache config out of a Prometheus text page.

    kv_cache_usage is vllm:kv_cache_usage_perc (formerly gpu_cache_usage_perc); the KV cache size comes
    from vllm:cache_config_info's labels.
    """
    m = EngineMetrics()
    usage: list[float] = []
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        space = line.rfind(" ")
        if space < 0:
            continue
        name = line[5:brace if 0 <= brace < space else space]
        if name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                    "gpu_cache_usage_perc"):
            try:
                value = float(line[space + 1:])
            except ValueError:
                continue
            if name == "num_requests_running":
                m.num_requests_running += value
            elif name == "num_requests_waiting":
                m.num_requests_waiting += value
            else:
                usage.append(value)
        elif name == "cache_config_info" and brace >= 0:
            labels = dict(_LABEL.findall(line[brace:space]))
            try:
                m.num_gpu_blocks = (m.num_gpu_blocks or 0) + int(labels.get("num_gpu_blocks", ""))
            except ValueError:
                pass
            try:
                m.block_size = int(labels.get("block_size", ""))
            except ValueError:
                pass
    if usage:
        # Data-parallel servers report one gauge per engine; their mean is the server's usage.
        m.kv_cache_usage = sum(usage) / len(usage)
    return m


def parse_vllm_totals(text: str) -> EngineTotals:
    """The run histograms and counters (`RUN_HISTOGRAMS`, `RUN_COUNTERS`) of a vLLM /metrics page."""
    return parse_engine_totals(text, RUN_HISTOGRAMS, RUN_COUNTERS)


class VLLMServer(OpenAIServer):
    """One vLLM OpenAI-compatible server (implements `EngineServer`)."""

    async def metrics(self, timeout_s: float = 2.0) -> EngineMetrics:
        return parse_vllm_metrics(await self.metrics_text(timeout_s))

    async def run_totals(self, timeout_s: float = 5.0) -> EngineTotals:
        text = await self.metrics_text(timeout_s)
        # The full parser takes milliseconds on a vLLM page: not on the gateway's loop.
        return await asyncio.to_thread(parse_vllm_totals, text)

    async def is_sleeping(self, timeout_s: float = 5.0) -> bool | None:
        """The engine's sleep state; None when it has no sleep endpoint (not in dev mode)."""
        try:
            status, body = await self._call("GET", "/is_sleeping", timeout_s)
            if status != 200:
                return None
            return bool(orjson.loads(body).get("is_sleeping"))
        except (EngineError, orjson.JSONDecodeError, AttributeError):
            return None

    async def sleep(self, level: int = 1, timeout_s: float = 600.0) -> None:
        """POST /sleep?level=N (vLLM sleep mode: weights to CPU at level 1, KV cache freed)."""
        await self._post(f"/sleep?level={level}", timeout_s)

    async def wake_up(self, timeout_s: float = 600.0) -> None:
        await self._post("/wake_up", timeout_s)


KIND = EngineKind(
    name="vllm",
    connect=VLLMServer,
    launch_env={"VLLM_SERVER_DEV_MODE": "1"},  # the sleep and wake-up endpoints
    sleep_mode_hint="start vLLM with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1",
)
