"""A request as the gateway handles it: the policy's `Request`, its client's connection, its progress."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlmctl.core.request import Request
from qlmctl.engines.base import Api

if TYPE_CHECKING:
    from qlmctl.gateway.instance import LiveEngine
    from qlmctl.gateway.reqmetrics import ClassSeries


@dataclass(slots=True, eq=False)
class LiveRequest:
    """A request as the gateway handles it: the policy's `Request` plus what the HTTP side needs."""

    req: Request
    api: Api
    body: dict[str, Any]
    """The client's request body."""
    client_id: str
    """The id the client sees in every chunk, whatever engine produced it."""
    created: int
    stream: bool
    include_usage: bool = False
    continuous_usage: bool = False
    external_id: str | None = None
    """The client's x-request-id, if it sent one."""
    ignored: list[str] = field(default_factory=list)
    """Body fields the gateway did not forward (not in the engines' API)."""
    # Progress, kept across evictions.
    sent: int = 0
    """Output tokens delivered to the client."""
    pieces: list[str] = field(default_factory=list)
    """Output text delivered to the client, in order (the resume prompt is built from it)."""
    out_ids: list[int] | None = None
    """Output token ids delivered to the client, in order, for a token-id prompt (the engine returns them:
    vLLM's `return_token_ids`); None for other prompts, or once a chunk came without its ids."""
    finish_reason: str | None = None
    text_only: bool = True
    """Whether `pieces` is the whole answer so far (False once tool calls or reasoning were sent: a resume
    then regenerates and skips what was sent, as `live.resume: restart` does)."""
    prompt_tokens: int | None = None
    """The engine's prompt token count (first attempt), once known."""
    # Placement.
    engine: LiveEngine | None = None
    """The engine it was dispatched to, while it is on one."""
    waiter: asyncio.Future | None = None
    scope: Any = None
    """Cancel scope around the upstream stream while one is open; an eviction expires it."""
    evict_pending: bool = False
    queued: bool = False
    cancelled: bool = False
    """The client went away."""
    done: bool = False
    kv_tokens: int = 0
    """Tokens this request counts for in its instance's KV estimate."""
    prefill_tokens: int = 0
    """Tokens its engine still has to prefill for this attempt (until its first token of the attempt)."""
    engine_priority: int | None = None
    """The `priority` the policy gave this attempt for an engine that schedules by priority (vLLM's field)."""
    policy_done: bool = False
    """The policy no longer holds it (it refused it at admission): not to be told it finished."""
    attempts: int = 0
    retries: int = 0
    """Times an engine failed it and it went back to its queue."""
    avoid: int | None = None
    """The instance whose engine failed its last attempt: its retry goes elsewhere if it can."""
    abort: tuple[int, str] | None = None
    """Set when the gateway ends it (shutting down, model unavailable): the HTTP status and message."""
    # Metrics (qlmctl.gateway.reqmetrics).
    series: ClassSeries | None = None
    """Its (model, SLO class) series of the `qlm:` metrics."""
    dispatched: bool = False
    """Dispatched at least once (its queue time is observed at its first dispatch)."""
    last_token_t: float | None = None
    """time.monotonic() when its last tokens reached the client (for the inter-token gaps)."""

    def end(self, now: float, error: str | None) -> bool:
        """Mark it ended at `now` (failed with `error`, unless None) with what was sent; False if it had
        ended already. The clusters' `finished` (live and relay worker) start with this."""
        if self.done:
            return False
        self.done = True
        r = self.req
        r.finish_s = now
        r.generated_tokens = self.sent
        if error is not None:
            r.error = error
        return True
