"""An engine server that speaks the OpenAI API over HTTP: streamed completions, health, the metrics page.

The base of engine kinds whose servers are OpenAI-compatible (vLLM's is): a keep-alive connection pool
(`qlmctl.engines.http`), streams read as server-sent events, each network read split into whole events
and decoded with orjson, and the events of one read handed over together so that the gateway can forward
them in one write.

Leaving a stream before its end (an eviction, a client gone away) closes its connection, which is how
vLLM learns to abort the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson

from qlmctl.engines.base import Api, EngineError, FailureKind
from qlmctl.engines.http import ConnectError, HTTPError, LocalResourceError, Pool, Response, sse_data, timeout

PATHS: dict[Api, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

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
            self._body = b""  # sent: a large body is not held while its answer streams
        except HTTPError as e:
            kind = (FailureKind.LOCAL if isinstance(e, LocalResourceError)
                    else FailureKind.CONNECT if isinstance(e, ConnectError) else FailureKind.LOST)
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


class OpenAIServer:
    """HTTP access to one OpenAI-compatible server (base URL without /v1): the parts every such kind shares.

    A kind subclasses it with what its API adds (metrics, sleep mode).
    """

    def __init__(self, url: str, max_connections: int = 4096, connect_timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._pool = Pool(self.url, max_idle=max_connections, connect_timeout_s=connect_timeout_s)

    def stream(self, api: Api, body: dict[str, Any]) -> SSEStream:
        """A streamed POST of `body` to the `api` endpoint; use as `async with`."""
        return SSEStream(self._pool, PATHS[api], orjson.dumps(body))

    async def _call(self, method: str, path: str, timeout_s: float, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            async with timeout(timeout_s):
                if body is not None:
                    resp = await self._pool.request(method, path, body, [("content-type", "application/json")])
                else:
                    resp = await self._pool.request(method, path, b"" if method == "POST" else None)
                try:
                    return resp.status, await resp.read()
                finally:
                    resp.close()
        except (HTTPError, TimeoutError) as e:
            kind = FailureKind.LOCAL if isinstance(e, LocalResourceError) else FailureKind.LOST
            raise EngineError(f"{method} {path} failed: {e or type(e).__name__}", kind=kind) from None

    async def metrics_text(self, timeout_s: float = 2.0) -> str:
        """The server's /metrics page (Prometheus text)."""
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

    async def _post(self, path: str, timeout_s: float) -> None:
        status, body = await self._call("POST", path, timeout_s)
        if status >= 300:
            raise EngineError(f"POST {path}: engine answered {status}", status, body.decode(errors="replace"))

    async def tokenize(self, body: dict[str, Any], timeout_s: float = 2.0) -> int:
        """Prompt tokens of `body` (`{"model", "prompt"}`, or `{"model", "messages"}` with the chat template)
        by the server's POST /tokenize (vLLM's)."""
        status, raw = await self._call("POST", "/tokenize", timeout_s, orjson.dumps(body))
        if status != 200:
            raise EngineError(f"POST /tokenize: engine answered {status}", status, raw.decode(errors="replace"))
        try:
            count = orjson.loads(raw)["count"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise EngineError("POST /tokenize: no count in the answer", kind=FailureKind.STATUS) from None
        if not isinstance(count, int):
            raise EngineError("POST /tokenize: the count is not an integer", kind=FailureKind.STATUS)
        return count

    async def model_root(self, timeout_s: float = 2.0) -> str | None:
        """Where the server loaded its model from (the first model's `root` in GET /v1/models: vLLM's model
        path or Hugging Face name), or None if it does not say."""
        status, raw = await self._call("GET", "/v1/models", timeout_s)
        if status != 200:
            return None
        try:
            root = orjson.loads(raw)["data"][0].get("root")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            return None
        return root if isinstance(root, str) and root else None

    async def aclose(self) -> None:
        await self._pool.aclose()
