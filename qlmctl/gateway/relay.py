"""One request's way through the live cluster: queue, dispatch, stream from an engine, survive evictions.

A `Relay` submits its request to the cluster, waits for the policy to dispatch it, streams the answer
from that engine to a `Sink` (server-sent events, or one JSON body at the end) and reports progress
back to the cluster. When the policy evicts the request, the upstream stream is cancelled (an engine
aborts a request whose connection closes), the request goes back to the policy, and on its next dispatch the
relay *resumes* it so that the client sees one seamless answer:

- `continue` (default): the new prompt is the original prompt followed by the text already sent
  (completions), or the conversation with the partial answer as a final assistant message continued
  with `continue_final_message` (chat); `max_tokens` becomes what is left. The engine recomputes the
  KV cache of the text so far (as vLLM does after its own preemption) and carries on from there.
- `restart`: the original request is sent again and the first tokens, already sent, are skipped.
  Exact at temperature 0 (the engine regenerates the same tokens); wasteful, but tokenizer-independent.

A completion whose prompt is token ids resumes from ids in either mode: the engine is asked for the ids
it generates (vLLM's `return_token_ids`), and the resumed prompt is the prompt's ids followed by those
already sent, so that nothing is re-tokenized. An engine that sends no ids falls back to `restart`. The ids
reach the client only if it asked for them itself.

Tokens are counted from the engine's cumulative usage in every chunk (vLLM's
`stream_options.continuous_usage_stats`), or one per non-empty chunk when an engine sends none. The
relay counts what reached the client, so the client gets exactly `max_tokens` tokens, each once.

Engine faults take the eviction's way back: an attempt that fails (connection refused or lost, an
error status or event, no first token within `live.first_token_timeout_s`, no token within
`live.inter_token_timeout_s`) sends the request to the head of its queue, to resume elsewhere, up to
`live.max_retries` times; then, or when the gateway ends it (shutting down, no engine for its model),
the client gets one error: an OpenAI-style body, or in a stream an error event and `[DONE]`. Every
request ends in exactly one complete answer or one error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson

from qlmctl.engines.base import EngineError, FailureKind
from qlmctl.engines.http import timeout
from qlmctl.gateway.cluster import LiveCluster
from qlmctl.gateway.instance import LiveEngine
from qlmctl.gateway.request import LiveRequest

log = logging.getLogger("qlmctl.gateway")

ResumeMode = str  # "continue" | "restart"

_GATEWAY_FIELDS = ("slo_class", "slo_ttft_s")
"""Body fields the gateway reads and engines must not see."""


class Sink(Protocol):
    """Where a relay's output goes (the client connection)."""

    started: bool

    async def start(self) -> None:
        """The answer begins (status line and headers, for a stream)."""

    async def send(self, events: list[dict[str, Any]]) -> None:
        """Forward these rewritten chunks."""

    async def finish(self, lr: LiveRequest) -> None:
        """The answer is complete."""

    async def fail(self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """The request failed with this OpenAI-style error (`headers`: extra ones, if the answer has not begun)."""


def error_body(message: str, status: int, err_type: str | None = None, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body."""
    types = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
             408: "RequestTimeoutError", 413: "RequestTooLargeError",
             429: "RateLimitError", 500: "InternalServerError", 502: "BadGatewayError",
             503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}
    return {"error": {"message": message, "type": err_type or types.get(status, "APIError"), "param": param,
                      "code": status}}


class Watchdog:
    """Expires an engine attempt's cancel scope when its stream goes quiet: no first token within
    `first_s`, or no token within `inter_s` of the last one (wall seconds).

    One timer per attempt. The first token moves it to `inter_s` from then; later tokens only note the
    time (one clock read each), and a timer that fires early re-arms itself at the last token plus
    `inter_s`: so a stream that stalls is caught `inter_s` after its last token, whatever the first-token
    limit.
    """

    __slots__ = ("_loop", "_scope", "_inter_s", "_limit", "_last", "_handle", "_got_first", "fired", "writing")

    def __init__(self, scope: Any, first_s: float, inter_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope = scope
        self._inter_s = inter_s
        self._limit = first_s
        self._last = self._loop.time()
        self._got_first = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(self._last + first_s, self._fire)
        self.fired: FailureKind | None = None
        """Why it expired the scope, once it has."""
        self.writing = False
        """True while the relay writes to its client: a slow client is not the engine's stall."""

    def progress(self) -> None:
        """Tokens arrived."""
        self._last = now = self._loop.time()
        if not self._got_first:
            self._got_first = True
            self._limit = self._inter_s
            if self._handle is not None:  # the first-token timer would fire `first_s` from the start
                self._handle.cancel()
                self._handle = self._loop.call_at(now + self._inter_s, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        if self.writing:
            self._last = now  # the client is slow to take the last tokens: the engine's clock restarts
        due = self._last + self._limit
        if now < due:
            self._handle = self._loop.call_at(due, self._fire)
            return
        self._handle = None
        self.fired = FailureKind.STALLED if self._got_first else FailureKind.FIRST_TOKEN_TIMEOUT
        self._scope.reschedule(now)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Relay:
    """Runs one request to its end: through the policy's queues and as many engine attempts as evictions
    and engine failures (within the retry budget) ask."""

    def __init__(self, cluster: LiveCluster, lr: LiveRequest, sink: Sink, resume: ResumeMode = "continue",
                 token_count: str = "usage", first_token_timeout_s: float = 300.0,
                 inter_token_timeout_s: float = 60.0) -> None:
        self.cluster = cluster
        self.lr = lr
        self.sink = sink
        self.resume = resume
        self.first_token_timeout_s = first_token_timeout_s
        self.inter_token_timeout_s = inter_token_timeout_s
        self._watchdog: Watchdog | None = None
        self._stream_options = {"include_usage": True, "continuous_usage_stats": token_count == "usage"}
        self._chat = lr.api == "chat"
        prompt = lr.body.get("prompt")
        self._ids_prompt = (not self._chat and isinstance(prompt, list) and bool(prompt)
                            and isinstance(prompt[0], int))
        """The prompt is token ids: ask the engine for the output's ids and resume from them."""
        self._client_ids = bool(lr.body.get("return_token_ids"))
        if self._ids_prompt:
            lr.out_ids = []
        self._skip = 0
        self._offset_shift = 0
        self._attempt_tokens = 0
        self._fin: str | None = None

    async def run(self) -> None:
        """Queue, stream, resume after evictions; ends with the sink finished or failed.

        Cancelling the task running this (the client went away) aborts the upstream stream and records
        the request as cancelled.
        """
        cluster, lr = self.cluster, self.lr
        cluster.submit(lr)
        try:
            while True:
                engine = await cluster.wait_dispatch(lr)
                if lr.done:
                    return
                if engine is None or lr.abort is not None:
                    status, message = lr.abort or (503, "the gateway is shutting down")
                    await self._fail(status, message)
                    return
                lr.attempts += 1
                if lr.evict_pending and lr.finish_reason is None:
                    cluster.evicted(lr)
                    continue
                failure: FailureKind | None = None
                detail = ""
                try:
                    async with timeout(None) as scope:
                        lr.scope = scope
                        self._watchdog = Watchdog(scope, self.first_token_timeout_s, self.inter_token_timeout_s)
                        try:
                            await self._attempt(engine)
                        finally:
                            lr.scope = None
                            self._watchdog.cancel()
                except TimeoutError:
                    if lr.abort is not None:
                        await self._fail(*lr.abort)
                        return
                    if lr.evict_pending:
                        if lr.finish_reason is None:
                            cluster.evicted(lr)
                            continue
                        # Evicted between its last token and the end of the stream: it is complete.
                    elif self._watchdog.fired is not None:
                        failure = self._watchdog.fired
                        detail = f"no token for {self._quiet_limit(failure):g} s"
                    else:
                        raise
                except EngineError as e:
                    if not e.retryable:
                        # The engine refused the request itself (a 4xx): the client's to see, as sent.
                        cluster.finished(lr, error=f"{engine.url}: {e}")
                        body = e.body if isinstance(e.body, dict) and "error" in e.body else None
                        if body is None and isinstance(e.body, dict) and "message" in e.body:
                            body = {"error": e.body}  # vLLM's older flat error body
                        await self.sink.fail(e.status, body or error_body(str(e), e.status))
                        return
                    failure, detail = e.kind, str(e)
                if failure is not None and not self._complete():
                    log.info("request %d: attempt %d on %s failed (%s): %s", lr.req.request_id, lr.attempts,
                             engine.url, failure.value, detail)
                    if cluster.retry(lr, engine, failure):
                        continue
                    await self._fail(504 if failure in (FailureKind.FIRST_TOKEN_TIMEOUT, FailureKind.STALLED)
                                     else 503 if failure is FailureKind.LOCAL else 502,
                                     f"{failure.describe()} on {lr.attempts} attempt(s) (retry budget "
                                     f"{cluster.max_retries} spent)", internal=f"{engine.url}: {failure.value}: {detail}")
                    return
                cluster.finished(lr)
                await self.sink.finish(lr)
                return
        except asyncio.CancelledError:
            cluster.finished(lr, error="client disconnected", outcome="cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - a bug here must still free the request's place on its engine
            log.exception("request %d failed in the gateway", lr.req.request_id)
            cluster.finished(lr, error=f"gateway error: {type(e).__name__}: {e}")
            try:
                await self.sink.fail(500, error_body(f"gateway error: {type(e).__name__}", 500))
            except Exception:  # noqa: BLE001 - the client connection may be the broken part
                pass

    def _complete(self) -> bool:
        """Whether the client already has the whole answer (a failure after the last token changes nothing)."""
        lr = self.lr
        return lr.finish_reason is not None or lr.sent >= lr.req.output_tokens

    def _quiet_limit(self, kind: FailureKind) -> float:
        return self.first_token_timeout_s if kind is FailureKind.FIRST_TOKEN_TIMEOUT else self.inter_token_timeout_s

    async def _fail(self, status: int, message: str, internal: str | None = None) -> None:
        """End the request with one error: recorded (`internal` detail, else `message`) and sent."""
        self.cluster.finished(self.lr, error=internal or message)
        headers = [(b"retry-after", str(self.cluster.retry_after_s).encode())] if status == 429 else None
        await self.sink.fail(status, error_body(message, status), headers)

    def upstream_body(self) -> dict[str, Any]:
        """The body for the next attempt: the client's, streamed, resumed past what was already sent."""
        lr = self.lr
        body = {k: v for k, v in lr.body.items() if k not in _GATEWAY_FIELDS}
        body["stream"] = True
        body["stream_options"] = self._stream_options
        if lr.engine_priority is not None:
            body["priority"] = lr.engine_priority
        if self._ids_prompt:
            body["return_token_ids"] = True
        self._attempt_tokens = 0
        self._skip = 0
        self._offset_shift = 0
        self._fin = None
        if lr.sent == 0:
            return body
        if self._ids_prompt:
            ids = lr.out_ids
            if ids is None or len(ids) != lr.sent:
                self._skip = lr.sent  # the engine did not return every id: regenerate and skip
                return body
            body["prompt"] = [*body["prompt"], *ids]
            body["echo"] = False
            self._offset_shift = len("".join(lr.pieces))
            if body.get("max_tokens", 16) is not None:
                body["max_tokens"] = max(1, body.get("max_tokens", 16) - lr.sent)
            if body.get("min_tokens"):
                body["min_tokens"] = max(0, body["min_tokens"] - lr.sent)
            return body
        if self.resume == "restart" or not lr.text_only:
            self._skip = lr.sent
            return body
        done = "".join(lr.pieces)
        if self._chat:
            body["messages"] = [*body["messages"], {"role": "assistant", "content": done}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
            for key in ("max_completion_tokens", "max_tokens"):
                if body.get(key) is not None:
                    body[key] = max(1, body[key] - lr.sent)
        else:
            prompt = body["prompt"]
            body["prompt"] = (prompt[0] if isinstance(prompt, list) else prompt) + done
            body["echo"] = False
            self._offset_shift = len(done)
            if body.get("max_tokens", 16) is not None:
                body["max_tokens"] = max(1, body.get("max_tokens", 16) - lr.sent)
        if body.get("min_tokens"):
            body["min_tokens"] = max(0, body["min_tokens"] - lr.sent)
        return body

    async def _attempt(self, engine: LiveEngine) -> None:
        lr, cluster, sink = self.lr, self.cluster, self.sink
        body = self.upstream_body()
        got_first = False
        async with engine.server.stream(lr.api, body) as stream:
            if not sink.started:
                await sink.start()
            async for events in stream:
                out: list[dict[str, Any]] = []
                texts: list[str] = []
                ids: list[int] | None = [] if lr.out_ids is not None else None
                n = 0
                for ev in events:
                    k = self._rewrite(ev, texts, ids)
                    if k < 0:
                        continue
                    n += k
                    out.append(ev)
                if n:
                    self._watchdog.progress()  # type: ignore[union-attr]
                    if not got_first:
                        got_first = True
                        cluster.first_token(lr)
                if out:
                    wd = self._watchdog
                    wd.writing = True  # type: ignore[union-attr]
                    try:
                        await sink.send(out)
                    finally:
                        wd.writing = False  # type: ignore[union-attr]
                    # Only what reached the client counts (an eviction may cancel the send).
                    cluster.tokens(lr, n)
                    lr.pieces.extend(texts)
                    if ids is not None and lr.out_ids is not None:
                        lr.out_ids.extend(ids)
                    if self._fin is not None:
                        lr.finish_reason = self._fin
        if not stream.done:
            raise EngineError("engine closed the stream before the end", kind=FailureKind.LOST)

    def _rewrite(self, ev: dict[str, Any], texts: list[str], ids: list[int] | None = None) -> int:
        """Count `ev`'s tokens and rewrite it for the client; -1: drop it. `ids`: where the chunk's output
        token ids go (a token-id prompt's)."""
        lr = self.lr
        if "error" in ev:
            err = ev["error"]
            msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise EngineError(f"engine error in stream: {msg}", kind=FailureKind.STREAM_ERROR)
        usage = ev.get("usage")
        choices = ev.get("choices")
        n = 0
        if usage:
            if lr.prompt_tokens is None:
                lr.prompt_tokens = usage.get("prompt_tokens")
            ct = usage.get("completion_tokens")
            if ct is not None:
                n = ct - self._attempt_tokens
                self._attempt_tokens = ct
        if not choices:
            return -1  # the usage-only chunk: the relay sends its own at the end
        c = choices[0]
        if self._chat:
            delta = c.get("delta") or {}
            text = delta.get("content") or ""
            other = delta.get("tool_calls") or delta.get("reasoning") or delta.get("reasoning_content")
            if other:
                lr.text_only = False  # its text alone no longer is the answer so far: a resume restarts
            elif lr.attempts > 1 and not text and c.get("finish_reason") is None:
                return -1  # the role chunk of a resumed attempt: the client has had one
            output = bool(text or other)
        else:
            text = c.get("text") or ""
            output = bool(text)
            if self._offset_shift:
                lp = c.get("logprobs")
                if isinstance(lp, dict) and isinstance(lp.get("text_offset"), list):
                    # The resumed attempt counts offsets from its own start: from the answer's start instead.
                    lp["text_offset"] = [o + self._offset_shift for o in lp["text_offset"]]
        if not usage or usage.get("completion_tokens") is None:
            n = 1 if output else 0
        if self._skip:
            if n <= self._skip:
                self._skip -= n
                if c.get("finish_reason") is None:
                    return -1
                n, text = 0, ""
                if self._chat:
                    c["delta"] = {}
                else:
                    c["text"] = ""
            else:
                n -= self._skip  # an engine chunk straddling the resume point (rare): keep it whole
                self._skip = 0
        fin = c.get("finish_reason")
        if fin is not None:
            self._fin = fin
        if self._ids_prompt:
            self._rewrite_ids(ev, c, n, ids)
        ev["id"] = lr.client_id
        ev["created"] = lr.created
        if lr.continuous_usage:
            p = lr.prompt_tokens or lr.req.prompt_tokens
            done = lr.sent + n
            ev["usage"] = {"prompt_tokens": p, "total_tokens": p + done, "completion_tokens": done}
        elif "usage" in ev:
            del ev["usage"]
        if text:
            texts.append(text)
        return n


    def _rewrite_ids(self, ev: dict[str, Any], c: dict[str, Any], n: int, ids: list[int] | None) -> None:
        """Keep a token-id prompt's output ids for a resume; show the client ids only if it asked for them."""
        got = c.get("token_ids")
        if ids is not None and n:
            if isinstance(got, list) and len(got) == n:
                ids.extend(got)
            else:
                self.lr.out_ids = None  # ids missing (or a chunk straddling a skip): a resume regenerates
        if not self._client_ids:
            c["token_ids"] = None
        if (not self._client_ids or self.lr.attempts > 1) and c.get("prompt_token_ids") is not None:
            c["prompt_token_ids"] = None  # a resumed attempt's prompt is not the client's


def usage_of(lr: LiveRequest) -> dict[str, int]:
    p = lr.prompt_tokens if lr.prompt_tokens is not None else lr.req.prompt_tokens
    return {"prompt_tokens": p, "total_tokens": p + lr.sent, "completion_tokens": lr.sent}


class StreamSink:
    """Server-sent events to an ASGI client, as vLLM sends them."""

    def __init__(self, send: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self._send = send
        self._headers = headers or []
        self.started = False

    async def start(self) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            *self._headers]})

    async def send(self, events: list[dict[str, Any]]) -> None:
        body = b"".join([b"data: " + orjson.dumps(ev) + b"\n\n" for ev in events])
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self, lr: LiveRequest) -> None:
        tail = b""
        if lr.include_usage:
            chunk = {"id": lr.client_id, "object": _chunk_object(lr), "created": lr.created, "model": lr.req.model,
                     "choices": [], "usage": usage_of(lr)}
            tail = b"data: " + orjson.dumps(chunk) + b"\n\n"
        await self._send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})

    async def fail(self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
        if not self.started:
            await send_json(self._send, status, body, [*self._headers, *(headers or [])])
            return
        data = b"data: " + orjson.dumps(body) + b"\n\ndata: [DONE]\n\n"
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


class JSONSink:
    """One JSON answer at the end (a non-streaming client); the engine is still streamed from.

    The answer is put together from the chunks as vLLM's non-streamed answer is: the text (or the chat
    message's content), and when the engine sent them, logprobs (completions: `tokens`, `token_logprobs`,
    `top_logprobs`, `text_offset`; chat: `content` items), tool calls (the deltas of each call, by index:
    id, type and name from the first, `arguments` joined), reasoning text, token ids and stop reason.
    """

    def __init__(self, send: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self._send = send
        self._headers = headers or []
        self.started = False
        self._text: list[str] = []
        self._model: str | None = None
        self._reasoning: list[str] = []
        self._reasoning_key = "reasoning"
        self._calls: dict[int, dict[str, Any]] = {}
        self._args: dict[int, list[str]] = {}
        self._logprobs: dict[str, list[Any]] | None = None
        self._token_ids: list[int] | None = None
        self._stop_reason: Any = None
        self._top: dict[str, Any] = {}
        """Fields of the whole answer that vLLM sends once, in the first chunk (prompt_token_ids, ...)."""

    async def start(self) -> None:
        self.started = True  # nothing to send before the end

    async def send(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self._model = ev.get("model", self._model)
            c = ev["choices"][0]
            for key in ("prompt_token_ids", "prompt_logprobs", "prompt_text"):
                v = ev.get(key, c.get(key))
                if v is not None and key not in self._top:
                    self._top[key] = v
            if "delta" in c:
                self._chat_delta(c.get("delta") or {})
            elif c.get("text"):
                self._text.append(c["text"])
            lp = c.get("logprobs")
            if isinstance(lp, dict):
                if self._logprobs is None:
                    self._logprobs = {}
                for key, v in lp.items():
                    if isinstance(v, list):
                        self._logprobs.setdefault(key, []).extend(v)
            ids = c.get("token_ids")
            if isinstance(ids, list):
                self._token_ids = (self._token_ids or []) + ids
            if c.get("stop_reason") is not None:
                self._stop_reason = c["stop_reason"]

    def _chat_delta(self, d: dict[str, Any]) -> None:
        if d.get("content"):
            self._text.append(d["content"])
        for key in ("reasoning", "reasoning_content"):
            if d.get(key):
                self._reasoning.append(d[key])
                self._reasoning_key = key
        for tc in d.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            i = tc.get("index", len(self._calls))
            call = self._calls.setdefault(i, {"id": None, "type": "function", "function": {"name": None}})
            if tc.get("id"):
                call["id"] = tc["id"]
            if tc.get("type"):
                call["type"] = tc["type"]
            fn = tc.get("function") or {}
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
            if fn.get("arguments"):
                self._args.setdefault(i, []).append(fn["arguments"])

    async def finish(self, lr: LiveRequest) -> None:
        text = "".join(self._text)
        lp = self._logprobs or None
        if lr.api == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self._reasoning:
                message[self._reasoning_key] = "".join(self._reasoning)
            if self._calls:
                calls = []
                for i in sorted(self._calls):
                    call = self._calls[i]
                    call["function"]["arguments"] = "".join(self._args.get(i, []))
                    calls.append(call)
                message["tool_calls"] = calls
                if not text:
                    message["content"] = None
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": lp,
                                      "finish_reason": lr.finish_reason, "stop_reason": self._stop_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": lr.finish_reason,
                      "stop_reason": self._stop_reason}
            obj = "text_completion"
        if self._token_ids is not None:
            choice["token_ids"] = self._token_ids
        body = {"id": lr.client_id, "object": obj, "created": lr.created, "model": self._model or lr.req.model,
                "choices": [choice], "usage": usage_of(lr), **self._top}
        await send_json(self._send, 200, body, self._headers)

    async def fail(self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await send_json(self._send, status, body, [*self._headers, *(headers or [])])


def _chunk_object(lr: LiveRequest) -> str:
    return "chat.completion.chunk" if lr.api == "chat" else "text_completion"


async def send_json(send: Any, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
