"""An asyncio client for one vLLM OpenAI-compatible server: streamed completions, /metrics, sleep mode.

Only what the gateway needs, over a keep-alive connection pool (`qlmctl.live.http`). Streams are
server-sent events; each network read is split into whole events and decoded with orjson, and the
events of one read are handed over together so that the gateway can forward them in one write.

Leaving a stream before its end (an eviction, a client gone away) closes its connection, which is how
vLLM learns to abort the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson

from qlmctl.live.health import FailureKind
from qlmctl.live.http import ConnectError, HTTPError, Pool, Response, sse_data, timeout
from qlmctl.live.prom import EngineMetrics, parse_vllm_metrics

RETRYABLE_4XX = frozenset({408, 429})
"""Client-error statuses that say "not now" rather than "never": retried like a 5xx."""


class EngineError(Exception):
    """The engine answered with an error status, or the connection failed.

    `status` is the HTTP status (502 when the engine could not be reached or the stream broke);
    `body` the engine's error body when it sent one; `kind` how it failed (see `FailureKind`).
    """

    def __init__(self, message: str, status: int = 502, body: Any = None,
                 kind: FailureKind = FailureKind.LOST) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.kind = kind

    @property
    def retryable(self) -> bool:
        """Whether another engine (or a later attempt) may succeed: all but the client's own errors (4xx)."""
        return self.kind is not FailureKind.STATUS or self.status >= 500 or self.status in RETRYABLE_4XX


_STREAM_HEADERS = [("content-type", "application/json"), ("accept", "text/event-stream")]


class SSEStream:
    """One streamed request: `async with` sends it and checks the status; iterate for event batches."""

    def __init__(self, pool: Pool, path: str, body: bytes) -> None:
        self._pool = pool
        self._path = path
        self._body = body
        self._resp: Response | None = None
        self.done = False
        """True once the server sent `data: [DONE]`."""

    async def __aenter__(self) -> "SSEStream":
        try:
            resp = await self._pool.request("POST", self._path, self._body, _STREAM_HEADERS)
        except HTTPError as e:
            kind = FailureKind.CONNECT if isinstance(e, ConnectError) else FailureKind.LOST
            raise EngineError(f"engine unreachable: {e}", kind=kind) from None
        self._resp = resp
        if resp.status != 200:
            try:
                raw = await resp.read()
            except HTTPError:
                raw = b""
            finally:
                resp.close()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
            raise EngineError(f"engine answered {resp.status}", resp.status, body, FailureKind.STATUS)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._resp is not None:
            self._resp.close()

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]:
        assert self._resp is not None
        try:
            async for payloads in sse_data(self._resp):
                if self.done:
                    continue  # read to the end so that the connection goes back to the pool
                events = []
                for data in payloads:
                    if data == b"[DONE]":
                        self.done = True
                        break
                    try:
                        events.append(orjson.loads(data))
                    except orjson.JSONDecodeError:
                        raise EngineError(f"engine sent a malformed event: {data[:200]!r}") from None
                if events:
                    yield events
        except HTTPError as e:
            raise EngineError(f"engine stream broke: {e}") from None


class EngineClient:
    """HTTP access to one vLLM server (base URL without /v1)."""

    def __init__(self, url: str, max_connections: int = 4096, connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._pool = Pool(self.url, max_idle=max_connections, connect_timeout_s=connect_timeout_s)

    def stream(self, path: str, body: dict[str, Any]) -> SSEStream:
        """A streamed POST to `path` (e.g. /v1/completions) with `body`; use as `async with`."""
        return SSEStream(self._pool, path, orjson.dumps(body))

    async def _call(self, method: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        try:
            async with timeout(timeout_s):
                resp = await self._pool.request(method, path, b"" if method == "POST" else None)
                try:
                    return resp.status, await resp.read()
                finally:
                    resp.close()
        except (HTTPError, TimeoutError) as e:
            raise EngineError(f"{method} {path} failed: {e or type(e).__name__}") from None

    async def metrics(self, timeout_s: float = 2.0) -> EngineMetrics:
        return parse_vllm_metrics(await self.metrics_text(timeout_s))

    async def metrics_text(self, timeout_s: float = 2.0) -> str:
        """The engine's /metrics page (Prometheus text)."""
        status, body = await self._call("GET", "/metrics", timeout_s)
        if status != 200:
            raise EngineError(f"GET /metrics: engine answered {status}", status)
        return body.decode(errors="replace")

    async def health(self, timeout_s: float = 2.0) -> bool:
        try:
            status, _ = await self._call("GET", "/health", timeout_s)
        except EngineError:
            return False
        return status == 200

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

    async def _post(self, path: str, timeout_s: float) -> None:
        status, body = await self._call("POST", path, timeout_s)
        if status >= 300:
            raise EngineError(f"POST {path}: engine answered {status}", status, body.decode(errors="replace"))

    async def aclose(self) -> None:
        await self._pool.aclose()
