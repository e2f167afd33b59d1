"""Load streams held by a process of their own (profile-model's API-server windows): held, checked, stopped, and
never outliving the process that started them."""

from __future__ import annotations

import json
import multiprocessing
import time

import httpx
import pytest

from qlmctl.client.loadproc import LoadStreams, drain_stream
from qlmctl.emulator.server import start_emulator
from qlmctl.engines.vllm import parse_vllm_metrics
from simulator.profile import EngineProfile

PROFILE = dict(model="m", base_s=0.01, per_prefill_token_s=1e-5, per_decode_seq_s=1e-4, per_context_token_s=0.0,
               kv_blocks=4000, block_size=16, max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=4096,
               load_cold_s=1.0, load_warm_s=1.0)


def running(url: str) -> int:
    return parse_vllm_metrics(httpx.get(url + "/metrics", timeout=5).text).num_requests_running


def wait_for(pred, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.asyncio
async def test_streams_held_then_stopped_and_an_early_end_is_an_error():
    with start_emulator(EngineProfile(**PROFILE), "m") as emu:
        held = LoadStreams(emu.url, "m", [[7] * 64] * 6, 3000)
        held.start()
        try:
            wait_for(lambda: running(emu.url) == 6)
            held.check()
        finally:
            await held.stop()
        wait_for(lambda: running(emu.url) == 0)  # their connections closed: the engine aborted them

        short = LoadStreams(emu.url, "m", [[7] * 16] * 2, 20)  # done in a fraction of a second
        short.start()
        try:
            wait_for(lambda: short._proc.exitcode is not None)
            with pytest.raises(RuntimeError, match=r"ended early with 2 streams.*code 1: stream \d of 2, finished"):
                short.check()
        finally:
            await short.stop()


def _start_and_wait(url: str) -> None:
    held = LoadStreams(url, "m", [[7] * 64] * 4, 3000)  # (kept: its end of the pipe closing would stop the streams)
    held.start()
    time.sleep(600)


def test_streams_end_when_the_process_that_started_them_is_killed():
    with start_emulator(EngineProfile(**PROFILE), "m") as emu:
        parent = multiprocessing.get_context("spawn").Process(target=_start_and_wait, args=(emu.url,))
        parent.start()
        try:
            wait_for(lambda: running(emu.url) == 4, 60)
        finally:
            parent.kill()
            parent.join()
        wait_for(lambda: running(emu.url) == 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("usage", [False, True])
async def test_a_load_stream_asks_for_usage_in_every_chunk_only_when_told(usage: bool):
    bodies: list[dict] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, stream=httpx.ByteStream(b"data: [DONE]\n\n"))

    async with httpx.AsyncClient(base_url="http://engine", transport=httpx.MockTransport(answer)) as client:
        await drain_stream(client, "m", [7] * 8, 32, usage_chunks=usage)
    assert bodies[0]["stream"] is True and bodies[0]["prompt"] == [7] * 8
    if usage:
        assert bodies[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    else:
        assert "stream_options" not in bodies[0]
