"""Load streams held open by a process of their own, so that reading them costs the measuring client nothing.

`profile-model` measures the API server's time with probes sent while the engine streams hundreds of decodes.
Read by the probing process, those streams kept its event loop busy (0.4-0.8 CPU s/s at 128-256 streams on an
H100 host) and its lag went into every probe's TTFT, and from there into the fitted API-server cost: moved to
another process, the probes' TTFT fell by 10-14 ms (docs/fidelity.md, "What a probe costs the engine")."""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from qlmctl.childproc import stop_child, wait_told
from qlmctl.client.http import error_message


async def drain_stream(client: Any, model: str, prompt: list[int], max_tokens: int, usage_chunks: bool = False
                       ) -> None:
    """A streamed completion of `prompt` (token ids) whose bytes are read and dropped: load, not measurement.
    `usage_chunks`: every chunk carries the usage so far, as `qlmctl serve` asks under `live.token_count: usage`."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": True}
    if usage_chunks:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"engine answered {resp.status_code}: {error_message(await resp.aread())}")
        async for _ in resp.aiter_raw():
            pass


def _hold(conn: Connection, url: str, model: str, prompts: list[list[int]], max_tokens: int, timeout_s: float,
          api_key: str | None, verify: bool, usage_chunks: bool = False) -> None:
    """The child: one stream per prompt until the parent says stop or dies (its end of the pipe closes); exit
    code 1 if a stream ends first, its reason on stderr and sent up the pipe (for the parent's error)."""
    import httpx

    async def run() -> int:
        client = httpx.AsyncClient(base_url=url, timeout=timeout_s, verify=verify,
                                   headers={"authorization": f"Bearer {api_key}"} if api_key else {},
                                   limits=httpx.Limits(max_connections=len(prompts) + 8))
        loop = asyncio.get_running_loop()
        told = loop.create_future()
        # A daemon thread, not `to_thread`: the loop must be able to end while it still waits.
        threading.Thread(target=_wait_told, args=(conn, loop, told), daemon=True).start()
        streams = [asyncio.create_task(drain_stream(client, model, p, max_tokens, usage_chunks)) for p in prompts]
        done, _ = await asyncio.wait([*streams, told], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if told not in done:
            ended = next(iter(done))
            err = ended.exception()
            reason = (f"stream {streams.index(ended)} of {len(streams)}, "
                      + (f"{type(err).__name__}: {err}" if err else "finished (all its tokens)"))
            print(f"a load stream ended early: {reason}", file=sys.stderr, flush=True)
            try:
                conn.send(reason)
            except OSError:  # the parent has gone
                pass
            code = 1
        for t in streams:
            t.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await client.aclose()
        return code

    sys.exit(asyncio.run(run()))


def _wait_told(conn: Connection, loop: asyncio.AbstractEventLoop, told: asyncio.Future) -> None:
    wait_told(conn)
    try:
        loop.call_soon_threadsafe(lambda: told.done() or told.set_result(None))
    except RuntimeError:  # the loop has ended
        pass


class LoadStreams:
    """One streamed completion per prompt (token ids) asking for `max_tokens`, bytes dropped, held by a child
    process from `start()` to `stop()` (the engine aborts them when their connections close). `check()` raises if
    any has ended. If this process dies, the child sees its pipe close and ends its streams. `usage_chunks`: the
    streams ask for the usage so far in every chunk (see `drain_stream`)."""

    def __init__(self, url: str, model: str, prompts: list[list[int]], max_tokens: int, *, timeout_s: float = 600.0,
                 api_key: str | None = None, verify: bool = True, usage_chunks: bool = False) -> None:
        self._args = (url, model, prompts, max_tokens, timeout_s, api_key, verify, usage_chunks)
        self._proc: Any = None
        self._conn: Connection | None = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with a running event loop
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_hold, args=(child, *self._args), daemon=True, name="qlmctl-load-streams")
        self._proc.start()
        child.close()
        self._conn = parent

    def check(self) -> None:
        """Raise RuntimeError if the child has exited (a stream ended, or it failed to start)."""
        if self._proc is not None and not self._proc.is_alive():
            reason = "its reason is on stderr"
            try:
                if self._conn is not None and self._conn.poll():
                    reason = str(self._conn.recv())
            except (EOFError, OSError):
                pass
            raise RuntimeError(f"a load stream ended early with {len(self._args[2])} streams (the load process exited "
                               f"with code {self._proc.exitcode}: {reason})")

    async def stop(self, timeout_s: float = 10.0) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        await asyncio.to_thread(stop_child, proc, conn, timeout_s)
        self._proc = self._conn = None
