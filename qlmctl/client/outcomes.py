"""What a client got from the gateway, classified: a complete answer, one clear error, or neither (lost).

For fault, load and shutdown tests and benchmarks (`tests/test_faults.py`, `bench/bench_faults.py`):
`call` sends one completion through `qlmctl.engines.http.Pool` (cheap enough for thousands of
concurrent streams from one process) and records everything the client saw; `Outcome.kind` says
which of the three it was, and `Tally` counts them.

- completed: HTTP 200 and, for a stream, exactly one `[DONE]` and no error event (a JSON answer: usage);
- failed: an OpenAI-style error (`{"error": {"message", "type", "code"}}`) as the whole answer (4xx/5xx),
  or, in a stream that had begun, exactly one error event followed by exactly one `[DONE]`;
- lost: anything else (a stream cut without `[DONE]`, two outcomes, a malformed answer, no answer).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from qlmctl.engines.http import HTTPError, Pool, sse_data, timeout


@dataclass(slots=True)
class Outcome:
    """One request as its client saw it."""

    stream: bool = False
    status: int = 0
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: dict[str, Any] | None = None
    """The error object of an error body or error event."""
    done_events: int = 0
    error_events: int = 0
    chunks: int = 0
    retry_after: str | None = None
    exception: str | None = None
    ttft_s: float | None = None
    """Wall seconds from sending to the first text."""
    e2e_s: float | None = None
    ids: set[str] = field(default_factory=set)

    @property
    def kind(self) -> str:
        """"completed", "failed" or "lost"."""
        if self.exception is not None:
            return "lost"
        clear = self.error is not None and isinstance(self.error.get("message"), str) and "type" in self.error
        if self.status == 200:
            whole = self.done_events == 1 if self.stream else self.completion_tokens is not None
            if self.error_events == 0 and self.error is None and whole:
                return "completed"
            if self.error_events == 1 and self.done_events == 1 and clear:
                return "failed"
            return "lost"
        if self.status >= 400 and clear and self.error_events == 0:
            return "failed"
        return "lost"


@dataclass(slots=True)
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def add(self, o: Outcome) -> None:
        self.sent += 1
        setattr(self, o.kind, getattr(self, o.kind) + 1)
        self.by_status[o.status] = self.by_status.get(o.status, 0) + 1


async def call(pool: Pool, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
               timeout_s: float = 60.0) -> Outcome:
    """Send one completion and read its whole answer (streamed when `body["stream"]`)."""
    out = Outcome(stream=bool(body.get("stream")))
    hdrs = [("content-type", "application/json"), *(headers or {}).items()]
    t0 = time.monotonic()
    resp = None
    try:
        async with timeout(timeout_s):
            resp = await pool.request("POST", path, orjson.dumps(body), hdrs)
            out.status = resp.status
            out.retry_after = resp.headers.get("retry-after")
            if resp.status != 200 or not body.get("stream"):
                raw = await resp.read()
                _read_json(out, raw, t0)
            else:
                await _read_stream(out, resp, t0)
    except (HTTPError, TimeoutError, asyncio.IncompleteReadError, orjson.JSONDecodeError) as e:
        out.exception = f"{type(e).__name__}: {e}"
    finally:
        if resp is not None:
            resp.close()
    out.e2e_s = time.monotonic() - t0
    return out


def _read_json(out: Outcome, raw: bytes, t0: float) -> None:
    data = orjson.loads(raw) if raw else None
    if not isinstance(data, dict):
        out.exception = f"not a JSON object: {raw[:100]!r}"
        return
    if "error" in data:
        out.error = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
        return
    out.ttft_s = time.monotonic() - t0
    for c in data.get("choices") or ():
        out.text += c.get("text") or (c.get("message") or {}).get("content") or ""
    u = data.get("usage") or {}
    out.prompt_tokens, out.completion_tokens = u.get("prompt_tokens"), u.get("completion_tokens")
    if data.get("id"):
        out.ids.add(data["id"])


async def _read_stream(out: Outcome, resp: Any, t0: float) -> None:
    async for payloads in sse_data(resp):
        for data in payloads:
            if data == b"[DONE]":
                out.done_events += 1
                continue
            if out.done_events:
                out.exception = "data after [DONE]"
            ev = orjson.loads(data)
            out.chunks += 1
            if "error" in ev:
                out.error_events += 1
                out.error = ev["error"] if isinstance(ev["error"], dict) else {"message": str(ev["error"])}
                continue
            if ev.get("id"):
                out.ids.add(ev["id"])
            u = ev.get("usage")
            if u and not ev.get("choices"):
                out.prompt_tokens, out.completion_tokens = u.get("prompt_tokens"), u.get("completion_tokens")
            for c in ev.get("choices") or ():
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if piece:
                    if out.ttft_s is None:
                        out.ttft_s = time.monotonic() - t0
                    out.text += piece
    if out.done_events != 1 and out.exception is None:
        out.exception = f"stream ended with {out.done_events} [DONE] events"
