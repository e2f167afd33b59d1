"""Request bodies in the live gateway: how many bytes of them it holds at once, and reading one.

A request's body is held for the request's whole life (a resumed request is re-sent from it), first as
received, then as parsed, plus a serialized copy while it is being sent to an engine. `BodyBudget`
bounds what all of them take together (`live.max_body_bytes_in_flight`, beyond it 503 with
Retry-After) and per client address (`live.max_client_body_bytes_in_flight`, beyond it 429): a client
that sends many large bodies at once waits its turn instead of taking the gateway's memory.

Each request holds a `BodyLease`: twice its announced size (Content-Length) before a byte is read (or
twice what has arrived, for a body without a length), and after parsing settled at what it costs while
it lives, the received size (the serialized copy sent to engines is about as large) plus the parsed size
(Python strings: 1, 2 or 4 bytes per character, so a body whose text is not ASCII may cost more than
twice its size). A body that could never fit its client's share gets 413. The lease is released when
the request ends. A body refused for the budget (429, 503) is read and dropped before the answer, so
that the client sees the answer rather than a reset connection.

`read_body` reads a body into one buffer (no list of parts joined at the end; a large one is a memory
mapping of its announced size), and stops at `live.max_body_bytes` (413) or when the client goes away.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

Receive = Callable[[], Awaitable[dict[str, Any]]]

MIB = 1 << 20
MAP_BODIES_FROM = 1 << 20
"""Bodies of at least this many bytes (by Content-Length) are read into a memory mapping."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a body was refused: the status (413, 429, 503) and a message for the client."""

    status: int
    message: str


class BodyBudget:
    """Bytes of request bodies held at once, in total and per client address."""

    def __init__(self, total: int, per_client: int, registry: CollectorRegistry | None = None) -> None:
        self.total = total
        self.per_client = per_client
        self.held = 0
        self.by_client: dict[str, int] = {}
        self.peak = 0
        if registry is not None:
            Gauge("qlm_request_body_bytes", "Bytes of request bodies the gateway holds (received, parsed, "
                  "being sent).", registry=registry).set_function(lambda: self.held)

    def lease(self, client: str) -> BodyLease:
        return BodyLease(self, client)

    def _take(self, client: str, n: int, lease_now: int) -> Refusal | None:
        mine = self.by_client.get(client, 0)
        if lease_now + n > min(self.per_client, self.total):  # alone it could never fit: not a matter of waiting
            return Refusal(413, f"the request body costs {_mib(lease_now + n)} once parsed, over the "
                                f"{_mib(min(self.per_client, self.total))} one client may hold")
        if mine + n > self.per_client:
            return Refusal(429, f"this client's requests hold {_mib(mine)} of bodies (limit "
                                f"{_mib(self.per_client)}); retry when some have finished")
        if self.held + n > self.total:
            return Refusal(503, f"the gateway holds {_mib(self.held)} of request bodies (limit "
                                f"{_mib(self.total)}); retry later")
        self.held += n
        self.by_client[client] = mine + n
        self.peak = max(self.peak, self.held)
        return None

    def _give(self, client: str, n: int) -> None:
        if n <= 0:
            return
        self.held -= n
        left = self.by_client.get(client, 0) - n
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


class BodyLease:
    """What one request's body holds of the budget; `release` (idempotent) gives it back."""

    __slots__ = ("budget", "client", "bytes")

    def __init__(self, budget: BodyBudget, client: str) -> None:
        self.budget = budget
        self.client = client
        self.bytes = 0

    def grow(self, n: int) -> Refusal | None:
        """Take `n` more bytes; a refusal (and nothing taken) if the budget has not got them."""
        if n <= 0:
            return None
        refusal = self.budget._take(self.client, n, self.bytes)
        if refusal is None:
            self.bytes += n
        return refusal

    def settle(self, n: int) -> Refusal | None:
        """Hold exactly `n` bytes from now on (more or less than so far)."""
        if n > self.bytes:
            return self.grow(n - self.bytes)
        self.budget._give(self.client, self.bytes - n)
        self.bytes = n
        return None

    def release(self) -> None:
        self.budget._give(self.client, self.bytes)
        self.bytes = 0


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def parsed_size(body: dict[str, Any]) -> int:
    """Bytes the large strings of a parsed body take in Python (prompt, message contents); other fields are
    small next to them and counted in the received size."""
    size = 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        size += sys.getsizeof(prompt)
    elif isinstance(prompt, list):
        size += sys.getsizeof(prompt) + sum(sys.getsizeof(p) for p in prompt[:1_000_000] if isinstance(p, str))
        size += 28 * len(prompt)  # token ids
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, str):
                size += sys.getsizeof(c)
            elif isinstance(c, list):
                size += sum(sys.getsizeof(p.get("text", "")) for p in c if isinstance(p, dict))
    return size


@dataclass(slots=True)
class ReadResult:
    body: Any = None
    """The body: a bytearray, or an mmap for a large one (close it when parsed)."""
    refusal: Refusal | None = None
    disconnected: bool = False


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def read_body(receive: Receive, limit: int, lease: BodyLease, length: int | None) -> ReadResult:
    """The request body, in one buffer; the lease grows as a body of unknown length arrives.

    `length` is the announced Content-Length (already within `limit` and held by the lease), None for a
    chunked body. A large body of known length goes into an anonymous memory mapping of its size: its pages
    are touched only as the body arrives (no allocation and zeroing of the whole at once on the event
    loop), and they go back to the system as soon as the request is parsed.
    """
    if length is not None and length >= MAP_BODIES_FROM:
        buf: Any = mmap.mmap(-1, length)
        view = memoryview(buf)
        pos = 0
        try:
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return ReadResult(disconnected=True)
                chunk = msg.get("body", b"")
                end = pos + len(chunk)
                if end > length:  # h11 keeps to Content-Length; this guards the mapping all the same
                    return ReadResult(refusal=Refusal(400, "the body is longer than its Content-Length"))
                view[pos:end] = chunk
                pos = end
                more = msg.get("more_body", False)
        finally:
            view.release()
        if pos != length:
            buf.close()
            return ReadResult(refusal=Refusal(400, "the body is shorter than its Content-Length"))
        return ReadResult(buf)
    buf = bytearray()
    more = True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return ReadResult(disconnected=True)
        chunk = msg.get("body", b"")
        size = len(buf) + len(chunk)
        if length is not None:
            if size > length:
                return ReadResult(refusal=Refusal(400, "the body is longer than its Content-Length"))
        else:
            if size > limit:
                return ReadResult(refusal=Refusal(413, f"the request body is over {limit} bytes"))
            refusal = lease.grow(2 * len(chunk))  # as received and as it will be parsed
            if refusal is not None:
                return ReadResult(refusal=refusal)
        buf += chunk
        more = msg.get("more_body", False)
    if length is not None and len(buf) != length:
        return ReadResult(refusal=Refusal(400, "the body is shorter than its Content-Length"))
    return ReadResult(buf)


async def discard_body(receive: Receive) -> bool:
    """Read a body to its end without keeping it; False if the client went away first."""
    more = True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return False
        more = msg.get("more_body", False)
    return True
