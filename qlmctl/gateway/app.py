"""The gateway's HTTP side: an OpenAI-compatible ASGI app whose requests wait in the QLM core.

Endpoints (vLLM's OpenAI server's, so that clients need no change):

- POST /v1/completions and /v1/chat/completions, streamed (server-sent events) or not;
- GET /v1/models, /health, and /metrics (Prometheus text: see `qlmctl.gateway.exporter`).

A request names its SLO class in the `x-slo-class` header or the `slo_class` body field, or its own
TTFT deadline (seconds) in `x-slo-ttft-s` / `slo_ttft_s`; otherwise it gets the scenario's default
class (`live.default_slo_class`, else the class with the loosest TTFT deadline). An unknown class is a
400 error.

Bad input is a 4xx with an OpenAI-style body and never a 5xx; admission refuses at once, before a
request reaches a queue: 401 without the API key (when one is set; `qlmctl.gateway.security`), 413 for
a body over `live.max_body_bytes`, 429 with Retry-After beyond the class's queue limit
(`qlmctl.gateway.limits`), 503 while draining (SIGTERM) or when no healthy engine has served the model for
`live.unavailable_timeout_s`. GET /openapi.json describes the API.

The HTTP layer is a plain ASGI application on uvicorn: the completion endpoints are on the hot path of
every token, and a framework's per-request machinery (routing, dependency injection, response classes
with their own task groups) would cost more than the whole relay.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from qlmctl.core.request import Request
from qlmctl.gateway.bodies import BodyBudget, Refusal, content_length, discard_body, parsed_size, read_body
from qlmctl.gateway.cluster import LiveCluster
from qlmctl.gateway.exporter import GatewayMetrics
from qlmctl.gateway.fields import FieldFilter, ignored_header
from qlmctl.gateway.limits import AdmissionMetrics, QueueLimits
from qlmctl.gateway.lograte import PER_EVENT
from qlmctl.gateway.openapi import openapi_document
from qlmctl.gateway.relay import JSONSink, Relay, StreamSink, error_body, send_json
from qlmctl.gateway.request import LiveRequest
from qlmctl.gateway.security import UNLIMITED, APIKeyCheck, KeyPolicy
from qlmctl.gateway.tokenizer import PromptCounter, WordCounter
from qlmctl.scenario import Scenario

log = logging.getLogger("qlmctl.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CUSTOM_CLASS = "custom"
"""SLO class label of requests that give their own TTFT deadline and no class."""


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict[str, Any], key: str, low: int) -> None:
    v = body.get(key)
    if v is not None and (not _is_int(v) or v < low):
        raise BadRequest(400, f"{key} must be an integer >= {low}", key)


_CLOSE = (b"connection", b"close")
"""Sent with an answer given before the request body was read: the connection is not reused (its unread
body would otherwise have to be read and thrown away)."""


class GatewayApp:
    """The ASGI application."""

    def __init__(self, cluster: LiveCluster, scenario: Scenario, metrics: GatewayMetrics, *,
                 api_key: str | None = None, api_keys: list[tuple[str, KeyPolicy]] | None = None,
                 resume: str = "continue", token_count: str = "usage",
                 render_metrics: Callable[[], Awaitable[bytes]] | None = None) -> None:
        self.cluster = cluster
        self._render_metrics = render_metrics
        """/metrics' body where it is not this process's registry alone (a relay worker asks the core)."""
        self.metrics = metrics
        self.resume = resume
        self.token_count = token_count
        sc = scenario
        self._classes = {
            name: (c.ttft_s, c.tpot_s, sc.slo_priority(name)) for name, c in sc.spec.slo_classes.items()
        }
        live = sc.spec.live
        default = live.default_slo_class if live is not None else None
        self.default_class = default or max(sc.spec.slo_classes, key=lambda k: sc.spec.slo_classes[k].ttft_s)
        self._max_len = {m: sc.profile(m).max_model_len for m in self.cluster.models}
        self.counters: dict[str, PromptCounter] = {m: WordCounter() for m in self.cluster.models}
        """Prompt token counters per model (`qlmctl.gateway.tokenizer`; the gateway resolves them at start)."""
        self._created = int(time.time())
        self.accepting = True
        """False once draining (SIGTERM): new completions get 503."""
        self.limits = QueueLimits.from_live(live)
        keys = [*([(api_key, UNLIMITED)] if api_key else []), *(api_keys or [])]
        self._auth = APIKeyCheck(keys) if keys else None
        self._max_body = live.max_body_bytes if live is not None else 32 << 20
        self.bodies = BodyBudget(live.max_body_bytes_in_flight if live is not None else 512 << 20,
                                 live.max_client_body_bytes_in_flight if live is not None else 128 << 20,
                                 metrics.registry)
        self.fields = FieldFilter(live.forward_fields if live is not None else ())
        self._first_token_timeout_s = live.first_token_timeout_s if live is not None else 300.0
        self._inter_token_timeout_s = live.inter_token_timeout_s if live is not None else 60.0
        self.admission = AdmissionMetrics(metrics.registry)
        self._retry_after = [(b"retry-after", str(self.limits.retry_after_s).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":  # open to load balancers, even with an API key
            healthy = self.accepting and any(inst.healthy for inst in self.cluster.instances)
            reason = "no healthy engine" if self.accepting else "the gateway is shutting down"
            await send_json(send, 200 if healthy else 503, {} if healthy else error_body(reason, 503))
            return
        policy = UNLIMITED if self._auth is None else self._auth.policy(_header(scope, b"authorization"))
        if policy is None:
            self.admission.rejected.labels("", "unauthorized").inc()
            await send_json(send, 401, error_body("Incorrect or missing API key: send `Authorization: Bearer <key>`",
                                                  401, param=None),
                            [(b"www-authenticate", b"Bearer"), *([_CLOSE] if method == "POST" else [])])
            return
        if method == "POST" and path == "/v1/completions":
            await self._completion(scope, receive, send, "completions", policy)
        elif method == "POST" and path == "/v1/chat/completions":
            await self._completion(scope, receive, send, "chat", policy)
        elif method == "GET" and path == "/v1/models":
            await send_json(send, 200, self._models())
        elif method == "GET" and path == "/openapi.json":
            await send_json(send, 200, openapi_document(self.cluster.models, list(self._classes)))
        elif method == "GET" and path == "/metrics":
            body = self.metrics.render() if self._render_metrics is None else await self._render_metrics()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]})
            await send({"type": "http.response.body", "body": body})
        else:
            await send_json(send, 404, error_body(f"no route {method} {path}", 404))

    def _models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": self._created, "owned_by": "qlmctl", "root": m,
             "parent": None, "max_model_len": self._max_len[m]}
            for m in self.cluster.models
        ]}

    async def _completion(self, scope: Scope, receive: Receive, send: Send, api: str,
                          policy: KeyPolicy = UNLIMITED) -> None:
        if not self.accepting:
            self.admission.rejected.labels("", "draining").inc()
            await send_json(send, 503, error_body("the gateway is shutting down", 503), [*self._retry_after, _CLOSE])
            return
        length = content_length(scope["headers"])
        if length is not None and length > self._max_body:
            await self._refuse(send, Refusal(413, f"the request body is over {self._max_body} bytes"), before_body=True)
            return
        client = scope.get("client")
        lease = self.bodies.lease(client[0] if client else "")
        try:
            # What it will cost once parsed, held before a byte is read: twice its size (settled after parsing).
            refusal = lease.grow(2 * (length or 0))
            if refusal is not None:
                if refusal.status != 413 and not await discard_body(receive):
                    return  # the client went away
                # Read and dropped (no more than max_body_bytes, within the body timeout): the client gets
                # its answer, not a reset, and may keep the connection.
                await self._refuse(send, refusal, before_body=refusal.status == 413)
                return
            got = await read_body(receive, self._max_body, lease, length)
            if got.disconnected:
                return
            if got.body is None:
                await self._refuse(send, got.refusal or Refusal(400, "invalid request body"), before_body=True)
                return
            raw = got.body
            size = len(raw)
            try:
                try:
                    lr = await self._parse(scope, raw, api, policy)
                except BadRequest:
                    raise
                except Exception as e:  # noqa: BLE001 - a body shape the checks missed is still the client's error
                    log.warning("unexpected request shape: %s: %s", type(e).__name__, e, extra=PER_EVENT)
                    raise BadRequest(400, f"invalid request body ({type(e).__name__})") from None
                finally:
                    if isinstance(raw, mmap.mmap):
                        raw.close()  # a large body's mapping: its pages go back at once
            except BadRequest as e:
                self.admission.rejected.labels("", "forbidden" if e.status == 403 else "bad_request").inc()
                await send_json(send, e.status, error_body(str(e), e.status, param=e.param))
                return
            del raw, got  # from here the body lives parsed (and serialized while sent to an engine)
            # What it holds while it lives: its size as received (the copy sent to engines is as large),
            # plus what it takes parsed.
            refusal = lease.settle(size + max(size, parsed_size(lr.body)))
            if refusal is not None:
                await self._refuse(send, refusal, before_body=False, slo_class=lr.req.slo_class)
                return
            await self._run(lr, receive, send)
        finally:
            lease.release()

    async def _refuse(self, send: Send, refusal: Refusal, before_body: bool, slo_class: str = "") -> None:
        """Answer a body the gateway will not hold (413, 429, 503) or could not read (400)."""
        reason = {413: "too_large", 429: "client_bodies", 503: "bodies"}.get(refusal.status, "bad_request")
        self.admission.rejected.labels(slo_class, reason).inc()
        headers = list(self._retry_after) if refusal.status in (429, 503) else []
        if before_body:
            headers.append(_CLOSE)
        await send_json(send, refusal.status, error_body(refusal.message, refusal.status), headers)

    async def _run(self, lr: LiveRequest, receive: Receive, send: Send) -> None:
        r = lr.req
        unavailable = self.cluster.health.unavailable_message(r.model)
        if unavailable is not None:
            self.admission.rejected.labels(r.slo_class, "unavailable").inc()
            await send_json(send, 503, error_body(unavailable, 503), self._retry_after)
            return
        if self.limits.full(r.slo_class, self.cluster.queued_by_class.get(r.slo_class, 0)):
            self.admission.rejected.labels(r.slo_class, "queue_full").inc()
            await send_json(send, 429, error_body(
                f"too many requests of SLO class '{r.slo_class}' are waiting (limit "
                f"{self.limits.limit(r.slo_class)}); retry after {self.limits.retry_after_s} s", 429),
                self._retry_after)
            return
        headers = [ignored_header(lr.ignored)] if lr.ignored else []
        sink = StreamSink(send, headers) if lr.stream else JSONSink(send, headers)
        relay = Relay(self.cluster, lr, sink, self.resume, self.token_count,
                      self._first_token_timeout_s, self._inter_token_timeout_s)
        task = asyncio.current_task()
        watcher = asyncio.create_task(_watch_disconnect(receive, lr, task))
        try:
            await relay.run()
        except asyncio.CancelledError:
            if not lr.done or lr.req.error != "client disconnected":
                raise
            # The client left; the relay aborted the upstream stream and recorded it. Nothing to send.
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
        finally:
            watcher.cancel()

    async def _parse(self, scope: Scope, raw: bytes | bytearray | mmap.mmap, api: str,
                     policy: KeyPolicy = UNLIMITED) -> LiveRequest:
        try:
            if isinstance(raw, mmap.mmap):
                with memoryview(raw) as view:
                    body = orjson.loads(view)
            else:
                body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(400, f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        headers = _headers(scope)
        model = body.get("model")
        if model is None and len(self.cluster.models) == 1:
            model = body["model"] = self.cluster.models[0]
        if not isinstance(model, str):
            raise BadRequest(400 if model is not None else 404,
                             "model must be a string" if model is not None else "The model `None` does not exist.",
                             "model")
        if model not in self._max_len:
            raise BadRequest(404, f"The model `{model}` does not exist.", "model")
        for key in ("n", "best_of"):
            v = body.get(key)
            if v is not None and (not _is_int(v) or v != 1):
                raise BadRequest(400, "the gateway serves one sequence per request (n = best_of = 1)", key)
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest(400, "stream must be a boolean", "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise BadRequest(400, "stream_options must be an object", "stream_options")
        opts = opts or {}
        _opt_int(body, "min_tokens", 0)
        cls, ttft, tpot, prio = self._slo(headers, body, policy)
        limit = self._max_len[model]
        if api == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest(400, "messages must be a non-empty list", "messages")
            for m in msgs:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise BadRequest(400, "each message must be an object with a string role", "messages")
                if not _valid_content(m.get("content")):
                    raise BadRequest(400, "message content must be a string or a list of content parts", "messages")
            prompt_tokens = await self.counters[model].count_chat(msgs, limit)
            _opt_int(body, "max_completion_tokens", 1)
            _opt_int(body, "max_tokens", 1)
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt_tokens = await self.counters[model].count(prompt, limit)
            elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
                prompt_tokens = len(prompt)
            else:
                raise BadRequest(400, "prompt must be one string (batches of prompts are not supported)", "prompt")
            max_tokens = body.get("max_tokens", 16)  # vLLM's default for completions
        if prompt_tokens >= limit:
            raise BadRequest(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                  f"{prompt_tokens} or more.", "messages" if api == "chat" else "prompt")
        if max_tokens is None:
            max_tokens = max(1, limit - prompt_tokens)
        elif not _is_int(max_tokens) or max_tokens < 1:
            raise BadRequest(400, "max_tokens must be a positive integer", "max_tokens")
        elif prompt_tokens + max_tokens > limit:
            raise BadRequest(400, f"This model's maximum context length is {limit} tokens; the request asks "
                                  f"for {prompt_tokens} prompt + {max_tokens} output tokens.", "max_tokens")
        ignored = self.fields.apply(api, body)
        if ignored:
            log.warning("request fields not forwarded to the engines (not in their API; live.forward_fields adds "
                        "fields): %s", ", ".join(ignored[:10]), extra=PER_EVENT)
        rid = self.cluster.new_request_id()
        r = Request(
            request_id=rid,
            arrival_s=self.cluster.now(),
            model=model,
            slo_class=cls,
            ttft_slo_s=ttft,
            prompt_tokens=prompt_tokens,
            output_tokens=max_tokens,
            tpot_slo_s=tpot,
            priority=prio,
        )
        prefix = "chatcmpl" if api == "chat" else "cmpl"
        return LiveRequest(
            req=r, api=api, body=body, client_id=f"{prefix}-qlm-{rid}", created=int(time.time()),
            stream=bool(stream), include_usage=bool(opts.get("include_usage")),
            continuous_usage=bool(opts.get("continuous_usage_stats")), external_id=headers.get("x-request-id"),
            ignored=ignored,
        )

    def _slo(self, headers: dict[str, str], body: dict[str, Any],
             policy: KeyPolicy = UNLIMITED) -> tuple[str, float, float | None, int]:
        cls = headers.get("x-slo-class") or body.get("slo_class")
        ttft_raw = headers.get("x-slo-ttft-s") or body.get("slo_ttft_s")
        if cls is not None and (not isinstance(cls, str) or cls not in self._classes):
            raise BadRequest(400, f"unknown SLO class {_short(cls)}; known: {', '.join(self._classes)}", "slo_class")
        if ttft_raw is None:
            name = cls or policy.default_slo_class or self.default_class
            ttft, tpot, prio = self._classes[name]
            self._allowed(policy, name, ttft)
            return name, ttft, tpot, prio
        try:
            ttft = float(ttft_raw) if isinstance(ttft_raw, (str, int, float)) and not isinstance(ttft_raw, bool) \
                else -1.0
        except (TypeError, ValueError, OverflowError):
            ttft = -1.0
        if not ttft > 0 or ttft == float("inf"):
            raise BadRequest(400, f"slo_ttft_s must be a positive number of seconds, got {_short(ttft_raw)}",
                             "slo_ttft_s")
        if cls is not None:
            class_ttft, tpot, prio = self._classes[cls]
            self._allowed(policy, cls, ttft, class_ttft)
            return cls, ttft, tpot, prio
        self._allowed(policy, None, ttft)
        # Its own deadline: vLLM priority of the tightest class that is at least as loose.
        looser = sorted((c for c in self._classes.values() if c[0] >= ttft), key=lambda c: c[0])
        prio = looser[0][2] if looser else max(c[2] for c in self._classes.values()) + 1
        return CUSTOM_CLASS, ttft, None, prio


    @staticmethod
    def _allowed(policy: KeyPolicy, cls: str | None, ttft: float, class_ttft: float | None = None) -> None:
        why = policy.check(cls, ttft, class_ttft)
        if why is not None:
            raise BadRequest(403, why, "slo_class" if cls is not None and class_ttft is None else "slo_ttft_s")


def _short(v: Any, n: int = 60) -> str:
    """A client's value, quoted and cut short, for an error message."""
    text = repr(v) if not isinstance(v, str) else f"'{v}'"
    return text if len(text) <= n else text[:n] + "...'"


def _valid_content(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    if isinstance(content, list):
        return all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content)
    return False


def _headers(scope: Scope) -> dict[str, str]:
    out = {}
    for k, v in scope["headers"]:
        if k.startswith(b"x-"):
            out[k.decode("latin-1")] = v.decode("latin-1")
    return out


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


async def _watch_disconnect(receive: Receive, lr: LiveRequest, task: asyncio.Task | None) -> None:
    """Cancel the request's task when its client disconnects before the answer is complete."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
    if not lr.done and task is not None:
        task.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
