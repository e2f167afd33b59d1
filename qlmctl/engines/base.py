"""The engine seam: what the gateway does with an engine server, whichever kind serves the model.

An *engine server* is one inference server process serving one model over HTTP with the OpenAI API
(vLLM's server is the first kind; `qlmctl emulate` speaks vLLM's API). The gateway streams completions
from it, aborts a request by leaving its stream (closing the connection), reads its load and KV cache
from its metrics, probes its health, and swaps the model awake on a GPU by putting the others to sleep.
`serve --launch` starts servers from the scenario's command template with their kind's environment.

A kind is one module: an `EngineServer` implementation and an `EngineKind` record, listed in
`qlmctl.engines.ENGINE_KINDS` under the name scenarios give in `live.engines[].kind`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Literal, Protocol

Api = Literal["completions", "chat"]
"""Which OpenAI endpoint a request is for: /v1/completions or /v1/chat/completions."""


class FailureKind(str, Enum):
    """How an engine attempt failed (the gateway's health and retry rules key on it)."""

    CONNECT = "connect"
    """The connection could not be made (refused, or no answer to the connect)."""
    LOST = "lost"
    """The connection was lost, or the stream ended early or was malformed."""
    STATUS = "status"
    """The engine answered an error status (5xx, 408, 429; other 4xx are the client's and not retried)."""
    STREAM_ERROR = "stream_error"
    """The engine sent an error event in the stream."""
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"
    """No first token within `live.first_token_timeout_s`."""
    STALLED = "stalled"
    """No token within `live.inter_token_timeout_s` of the last one."""
    POLL = "poll"
    """A /metrics poll failed (not a request's failure)."""
    LOCAL = "local"
    """The gateway itself ran out of a resource (file descriptors, memory): never the engine's fault."""

    @property
    def hard(self) -> bool:
        """Whether one such failure marks the engine unhealthy at once."""
        return self in _HARD

    def describe(self) -> str:
        """A short phrase for a client-facing error message (no engine address: clients need none)."""
        return _PHRASES[self]


_HARD = frozenset({FailureKind.CONNECT, FailureKind.LOST, FailureKind.FIRST_TOKEN_TIMEOUT, FailureKind.STALLED})
_PHRASES = {
    FailureKind.CONNECT: "the engine could not be reached",
    FailureKind.LOST: "the connection to the engine was lost",
    FailureKind.STATUS: "the engine answered with an error",
    FailureKind.STREAM_ERROR: "the engine reported an error in the stream",
    FailureKind.FIRST_TOKEN_TIMEOUT: "the engine sent no first token in time",
    FailureKind.STALLED: "the engine's stream stalled",
    FailureKind.POLL: "the engine did not answer",
    FailureKind.LOCAL: "the gateway is out of resources (connections or memory)",
}

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


@dataclass(slots=True)
class EngineMetrics:
    """An engine server's load and KV cache at one poll, in the gateway's terms (summed over its engines)."""

    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage: float | None = None
    """Fraction of KV blocks in use, 0..1."""
    num_gpu_blocks: int | None = None
    """KV cache size in blocks, when the server reports it."""
    block_size: int | None = None


@dataclass(slots=True)
class HistogramTotals:
    """One histogram's cumulative state, summed over its label sets."""

    count: float = 0.0
    sum: float = 0.0
    buckets: dict[str, float] = field(default_factory=dict)
    """Cumulative count per upper bound, keyed by the `le` label as the page spells it ("0.5", "+Inf")."""


@dataclass(slots=True)
class EngineTotals:
    """An engine's cumulative histograms and counters at one scrape (those present on its page)."""

    histograms: dict[str, HistogramTotals] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


class CompletionStream(Protocol):
    """One streamed completion: `async with` sends it and checks the status (raising `EngineError`);
    iterating yields the decoded chunks of each network read together. Leaving it early aborts the request."""

    done: bool
    """True once the server marked the end of the stream."""

    async def __aenter__(self) -> CompletionStream: ...

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    def __aiter__(self) -> AsyncIterator[list[dict[str, Any]]]: ...


class EngineServer(Protocol):
    """One engine server as the gateway uses it. Every call but `stream` raises nothing but `EngineError`
    (or answers False / None where it says so)."""

    url: str
    """Base URL, without /v1."""

    def stream(self, api: Api, body: dict[str, Any]) -> CompletionStream:
        """A streamed completion of an OpenAI request `body` (`stream` set, usage in every chunk if asked)."""
        ...

    async def metrics(self, timeout_s: float = 2.0) -> EngineMetrics:
        """Its load and KV cache now; cheap enough to poll every half second on the gateway's loop."""
        ...

    async def run_totals(self, timeout_s: float = 5.0) -> EngineTotals:
        """Its cumulative latency histograms and counters (the engine's side of a run report); parsed off
        the event loop, for the start and end of a run."""
        ...

    async def health(self, timeout_s: float = 2.0) -> bool:
        """Whether it answers its health check; False on any failure."""
        ...

    async def is_sleeping(self, timeout_s: float = 5.0) -> bool | None:
        """Whether its model is asleep; None when it has no sleep mode."""
        ...

    async def sleep(self, level: int = 1, timeout_s: float = 600.0) -> None:
        """Free the GPU (weights offloaded at level 1, KV cache dropped). A server still holding aborted
        requests may answer 409 for a step or two."""
        ...

    async def wake_up(self, timeout_s: float = 600.0) -> None:
        """Load the model back onto the GPU."""
        ...

    async def aclose(self) -> None:
        """Close its connections."""
        ...


@dataclass(frozen=True, slots=True)
class EngineKind:
    """A kind of engine server: how to talk to one and what launching one needs."""

    name: str
    """The scenario's `live.engines[].kind`."""
    connect: Callable[..., EngineServer]
    """(url, max_connections=...) -> the gateway's client of one server."""
    launch_env: Mapping[str, str]
    """Environment every launched server of this kind gets (`serve --launch`; before the scenario's own)."""
    sleep_mode_hint: str
    """How to start a server of this kind with sleep mode (for the error when one shares a GPU without it)."""
