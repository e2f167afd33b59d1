"""Client connections of the live gateway: read timeouts, an idle timeout, a connection limit.

uvicorn (h11) times out only a keep-alive connection that has answered a request and then stays silent:
a connection that never sends a whole request (no bytes, part of its headers, part of its body) is held
for ever, and nothing limits how many are open, so enough of them exhaust the process's file descriptors
(and with them the gateway's own connections to its engines). `ConnectionGuard` closes that gap; the
gateway's uvicorn server runs `guard.protocol_class()`, a subclass of uvicorn's h11 protocol that
reports each connection's state to the guard:

- `headers`: from the connection's accept (or the first byte of its next request on a kept-alive
  connection) until its request headers are complete: at most `header_timeout_s`, then 408 (if it had
  sent anything) and the connection is closed;
- `body`: from the headers until the body is complete: at most `body_timeout_s`, then 408 and closed;
- `idle`: a kept-alive connection between requests: at most `idle_timeout_s`, then closed;
- `active`: the request is read and the gateway is answering it (queued, streaming): no client-side
  limit (the engine-side timeouts apply), but a client that reads nothing of its answer for
  `send_timeout_s` while the gateway has data for it is disconnected (its request is abandoned);
- at most `max_connections` are open; a new one beyond that closes the oldest connection that is not
  `active` (idle first, then reading headers, then reading a body): a flood of half-open connections
  cannot lock out clients that send a whole request at once. When every open connection is active, the
  new one gets 503 with Retry-After and is closed.

The default connection limit is three quarters of the process's file-descriptor limit (`RLIMIT_NOFILE`),
less a reserve: the last quarter is for the gateway's connections to its engines (one per request
running there, plus idle ones kept for reuse), which only requests that have left the queue hold.

What the guard did is counted (`qlm_client_connections_closed_total{reason}`, `qlm_client_connections`)
and logged at most once per `log_interval_s`, as one line of totals, never per connection.

The state is all in the guard (one per gateway); the protocol subclass holds no more than its own
connection's state and a reference to its guard.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("qlmctl.gateway")

FD_RESERVE = 64
"""File descriptors kept back from the connection limit (listening socket, logs, pipes, probes)."""

_TIMED = ("idle", "headers", "body")
"""States with a deadline, in the order their oldest connection is closed for a new one at the limit."""

REASONS = ("header_timeout", "body_timeout", "idle_timeout", "send_timeout", "displaced", "refused")


def default_max_connections() -> int:
    """Client connections the file-descriptor limit allows: 3/4 of RLIMIT_NOFILE (soft) less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft * 3 // 4 - FD_RESERVE)


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (as Go's runtime does at start); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Client-side timeouts (wall seconds) and the connection limit (None: from the descriptor limit)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    send_timeout_s: float = 60.0
    max_connections: int | None = None
    log_interval_s: float = 10.0
    retry_after_s: int = 1

    @classmethod
    def from_live(cls, live: Any) -> "ClientLimits":
        if live is None:
            return cls()
        return cls(live.header_timeout_s, live.body_timeout_s, live.idle_timeout_s, live.send_timeout_s,
                   live.max_client_connections, live.log_interval_s, live.retry_after_s)


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = ('{"error":{"message":"%s","type":"%s","param":null,"code":%d}}'
            % (message, "RequestTimeoutError" if status == 408 else "ServiceUnavailableError", status)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """The client connections of one gateway: their states, deadlines, the limit, the counters and the log."""

    def __init__(self, limits: ClientLimits | None = None, registry: Any = None) -> None:
        self.limits = limits or ClientLimits()
        fd_max = default_max_connections()
        want = self.limits.max_connections
        self.max_connections = min(want, fd_max) if want is not None else fd_max
        if want is not None and want > fd_max:
            log.warning("live.max_client_connections %d is more than the file-descriptor limit allows; using %d "
                        "(raise `ulimit -n` for more)", want, fd_max)
        self._timeouts = {"idle": self.limits.idle_timeout_s, "headers": self.limits.header_timeout_s,
                          "body": self.limits.body_timeout_s}
        self._waiting: dict[str, OrderedDict[GuardedH11Protocol, float]] = {s: OrderedDict() for s in _TIMED}
        """Connections per timed state, oldest first, with the loop time they entered it."""
        self.open = 0
        self.closed: dict[str, int] = dict.fromkeys(REASONS, 0)
        """Connections the guard closed, by reason, since the start."""
        self._logged = dict(self.closed)
        self._last_log = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tick = max(0.02, min(0.1, min(self._timeouts.values()) / 4))
        self.late_max_s = 0.0
        """The most a connection was closed after its deadline (the sweep's period plus event-loop lag)."""
        self._late_logged = 0.0
        self._refusal = _raw_response(503, "Service Unavailable", "the gateway has too many open connections; retry "
                                      "later", f"retry-after: {self.limits.retry_after_s}\r\n")
        self._timeout_answer = _raw_response(408, "Request Timeout", "the request was not sent in time")
        self._metric = None
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self._metric = Counter(
                "qlm_client_connections_closed", "Client connections the gateway closed itself, by reason "
                "(header_timeout, body_timeout, idle_timeout, send_timeout, displaced: the oldest idle or half-open "
                "one at the connection limit, refused: 503 at the limit).", ["reason"], registry=registry)
            Gauge("qlm_client_connections", "Client connections open.", registry=registry).set_function(
                lambda: self.open)

    # ------------------------------------------------------------ lifecycle
    def protocol_class(self) -> type[GuardedH11Protocol]:
        """The uvicorn protocol class (`uvicorn.Config(http=...)`) whose connections this guard keeps."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last_log = self._loop.time()
        self._timer = self._loop.call_later(self._tick, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._log_totals(force=True)

    # ------------------------------------------------------------ events from the protocol
    def admit(self, conn: GuardedH11Protocol) -> bool:
        """A connection was accepted: True to keep it (closing an older idle one at the limit)."""
        if self.open >= self.max_connections:
            for state in _TIMED:
                waiting = self._waiting[state]
                if waiting:
                    oldest = next(iter(waiting))
                    self._close(oldest, "displaced", answer=None)
                    break
            else:
                self._count("refused")
                conn.reject(self._refusal)
                return False
        self.open += 1
        return True

    def enter(self, conn: GuardedH11Protocol, state: str | None, old: str | None) -> None:
        """`conn` moved from state `old` to `state` (None: gone)."""
        if old in self._waiting:
            self._waiting[old].pop(conn, None)
        if state in self._waiting:
            self._waiting[state][conn] = self._loop.time() if self._loop is not None else 0.0
        if state is None:
            self.open -= 1

    def send_timed_out(self, conn: GuardedH11Protocol) -> None:
        self._close(conn, "send_timeout", answer=None)

    # ------------------------------------------------------------ the sweep
    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for state, limit in self._timeouts.items():
            waiting = self._waiting[state]
            while waiting:
                conn, since = next(iter(waiting.items()))
                if since + limit > now:
                    break
                reason = {"idle": "idle_timeout", "headers": "header_timeout", "body": "body_timeout"}[state]
                late = now - since - limit
                if late > self._late_logged:
                    self._late_logged = late
                self.late_max_s = max(self.late_max_s, late)
                self._close(conn, reason, answer=None if state == "idle" or not conn.sent_anything
                            else self._timeout_answer)
        self._log_totals()
        self._timer = loop.call_later(self._tick, self._sweep)

    def _close(self, conn: GuardedH11Protocol, reason: str, answer: bytes | None) -> None:
        self._count(reason)
        state = conn.guard_state
        conn.guard_state = None
        self.enter(conn, None, state)
        conn.drop(answer)

    def _count(self, reason: str) -> None:
        self.closed[reason] += 1
        if self._metric is not None:
            self._metric.labels(reason).inc()

    def _log_totals(self, force: bool = False) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        if not force and now - self._last_log < self.limits.log_interval_s:
            return
        delta = {k: v - self._logged[k] for k, v in self.closed.items() if v != self._logged[k]}
        if not delta:
            return
        span = now - self._last_log
        self._logged = dict(self.closed)
        self._last_log = now
        lim = self.limits
        what = {"header_timeout": f"closed at the header timeout ({lim.header_timeout_s:g} s)",
                "body_timeout": f"closed at the body timeout ({lim.body_timeout_s:g} s)",
                "idle_timeout": f"closed idle ({lim.idle_timeout_s:g} s)",
                "send_timeout": f"closed for reading nothing of their answer ({lim.send_timeout_s:g} s)",
                "displaced": f"closed half-open or idle to admit new ones at the limit ({self.max_connections})",
                "refused": "refused with 503 (every connection busy)"}
        parts = [f"{n:,} {what[k]}" for k, n in delta.items()]
        late = f" (timeouts at most {self._late_logged:.2f} s late)" if self._late_logged else ""
        self._late_logged = 0.0
        log.warning("client connections in the last %.0f s: %s; %d open%s", span, "; ".join(parts), self.open, late)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, reporting its connection's state to a `ConnectionGuard` (class attribute
    `guard`, set by `ConnectionGuard.protocol_class`)."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard_state: str | None = None
        self.sent_anything = False
        """Whether the client sent bytes of its current request (a timeout then answers 408)."""
        self._write_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard.admit(self):
            self._set("headers")

    def data_received(self, data: bytes) -> None:
        if self.guard_state == "idle":
            self._set("headers")  # the next request on a kept-alive connection: its headers' time starts
        self.sent_anything = True
        super().data_received(data)
        self._sync()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self.guard_state is not None:
            state, self.guard_state = self.guard_state, None
            self.guard.enter(self, None, state)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None and self.guard_state is not None:
            self._write_timer = self.loop.call_later(self.guard.limits.send_timeout_s, self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # ------------------------------------------------------------ state
    def _sync(self) -> None:
        if self.guard_state is None or self.transport.is_closing():
            return
        theirs = self.conn.their_state
        if theirs is h11.SEND_BODY:
            self._set("body")
        elif theirs is h11.IDLE:
            if self.guard_state not in ("headers", "idle"):
                pending = bool(self.conn.trailing_data[0])  # bytes of the next request, already received
                self.sent_anything = pending
                self._set("headers" if pending else "idle")
        else:  # the request is read (DONE, MUST_CLOSE) or the connection is ending
            self._set("active")

    def _set(self, state: str) -> None:
        old = self.guard_state
        if old != state:
            self.guard_state = state
            self.guard.enter(self, state, old)

    def _send_timeout(self) -> None:
        self._write_timer = None
        if self.guard_state is not None and self.flow.write_paused:
            self.guard.send_timed_out(self)

    # ------------------------------------------------------------ called by the guard
    def reject(self, answer: bytes) -> None:
        self.drop(answer)

    def drop(self, answer: bytes | None) -> None:
        """Close the connection now (after `answer`, if the client can take it at once)."""
        transport = self.transport
        if transport.is_closing():
            return
        if answer is not None and not (self.cycle is not None and self.cycle.response_started):
            transport.write(answer)
        if transport.get_write_buffer_size():
            transport.abort()  # a client that reads nothing does not hold the descriptor
        else:
            transport.close()
