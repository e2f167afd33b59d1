"""Fault injection for the vLLM emulator: kill, hang, error rate, slowdown (so CI can test engine faults).

`Faults` are the settings; `FaultInjector` applies them to one emulated server, at start
(`create_app(..., faults=...)`, `qlmctl emulate --fault-...`) and at run time through the emulator's
admin endpoint (`POST /emulator/faults`, not part of vLLM's API). `FaultMiddleware` is the ASGI layer
that carries them out in front of the emulator's routes:

- kill: the server stops answering. Every open connection is dropped (streams are cut mid-answer, with
  no terminating chunk) and every new request's connection is dropped before any response. Only
  /emulator/* still answers, so that a test can bring the server back (`{}` heals it). A real process
  death also refuses connections; stop the emulator for that.
- hang: connections are accepted but nothing is answered: new requests are held (their bodies read),
  open streams stall at their next write. Healing releases both where they stopped.
- error rate: that fraction of completion requests (chat or not) answers 500 with an OpenAI-style body
  at once, drawn from a generator seeded with `seed` (the same sequence of outcomes on every run).
- slowdown: the emulated GPU runs `slowdown` times slower (the engine's clock changes rate without a
  jump), for every request in flight and to come.

`kill_after_s` / `hang_after_s` count wall seconds from when the faults are set; `down_for_s` (if set)
heals the server that long after a kill or hang started.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

log = logging.getLogger("qlmctl.emulator")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ADMIN_PREFIX = "/emulator/"
"""Paths the faults never touch (the emulator's own admin endpoints)."""
COMPLETION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass(frozen=True, slots=True)
class Faults:
    """What goes wrong on one emulated server. The defaults: nothing."""

    kill_after_s: float | None = None
    """Wall seconds after these faults are set at which the server dies (0: at once; None: never)."""
    hang_after_s: float | None = None
    """Wall seconds after these faults are set at which the server hangs (0: at once; None: never)."""
    down_for_s: float | None = None
    """Wall seconds a kill or hang lasts before the server heals by itself (None: until healed by hand)."""
    error_rate: float = 0.0
    """Fraction of completion requests answered with HTTP 500 at once, 0..1."""
    slowdown: float = 1.0
    """The emulated GPU runs this many times slower (1: normal speed; 4: a quarter of it)."""
    seed: int = 0
    """Seed of the error-rate draws."""

    def __post_init__(self) -> None:
        for name in ("kill_after_s", "hang_after_s", "down_for_s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0 or null, got {v!r}")
        if not (isinstance(self.error_rate, (int, float)) and not isinstance(self.error_rate, bool)
                and 0.0 <= self.error_rate <= 1.0):
            raise ValueError(f"error_rate must be a number in [0, 1], got {self.error_rate!r}")
        if not (isinstance(self.slowdown, (int, float)) and not isinstance(self.slowdown, bool)
                and math.isfinite(self.slowdown) and self.slowdown > 0):
            raise ValueError(f"slowdown must be a positive number, got {self.slowdown!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_json(cls, data: Any) -> "Faults":
        """Faults from a JSON object; fields left out take their defaults. ValueError names a bad field."""
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object of fault settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FaultState(str, Enum):
    OK = "ok"
    KILLED = "killed"
    HUNG = "hung"


class FaultInjector:
    """The faults of one emulated server, applied on its event loop.

    `set_speed(rate)` changes the emulated engine's clock rate (simulated seconds per wall second);
    `base_rate` is the server's configured speed-up, which a slowdown divides.
    """

    def __init__(self, faults: Faults, base_rate: float, set_speed: Callable[[float], None]) -> None:
        self.faults = faults
        self.base_rate = base_rate
        self._set_speed = set_speed
        self.state = FaultState.OK
        self._rng = random.Random(faults.seed)
        self._timers: list[asyncio.TimerHandle] = []
        self._running: asyncio.Event | None = None
        self._server: Any = None
        self._started = False
        # Counters, for GET /emulator/faults and tests.
        self.errors_injected = 0
        self.connections_dropped = 0
        self.requests_held = 0

    # ------------------------------------------------------------ control
    def attach_server(self, server: Any) -> None:
        """The uvicorn server whose connections a kill drops (`server.server_state.connections`)."""
        self._server = server

    def start(self) -> None:
        """Arm the initial faults (called once the server's loop runs)."""
        if not self._started:
            self._started = True
            self.apply(self.faults)

    def apply(self, faults: Faults) -> None:
        """Replace the faults: the server heals first, then the new settings take effect (timers from now)."""
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._heal()
        self._set_speed(self.base_rate / faults.slowdown)
        loop = asyncio.get_running_loop()
        for delay, action in ((faults.kill_after_s, self.kill), (faults.hang_after_s, self.hang)):
            if delay is None:
                continue
            if delay == 0:
                action()
            else:
                self._timers.append(loop.call_later(delay, action))

    def kill(self) -> None:
        """Die: drop every open connection; new ones are dropped until healed."""
        self.state = FaultState.KILLED
        self._event().set()  # held requests wake up, to be dropped
        log.warning("fault: killed (connections dropped)")
        self._drop_all()
        self._heal_later()

    def hang(self) -> None:
        """Hang: hold new requests, stall open streams, until healed."""
        if self.state is FaultState.KILLED:
            return
        self.state = FaultState.HUNG
        self._event().clear()
        log.warning("fault: hung")
        self._heal_later()

    def _heal_later(self) -> None:
        d = self.faults.down_for_s
        if d is not None:
            self._timers.append(asyncio.get_running_loop().call_later(d, self._heal))

    def _heal(self) -> None:
        if self.state is not FaultState.OK:
            log.warning("fault: healed")
        self.state = FaultState.OK
        self._event().set()

    def status(self) -> dict[str, Any]:
        return {"faults": self.faults.to_json(), "state": self.state.value,
                "errors_injected": self.errors_injected, "connections_dropped": self.connections_dropped,
                "requests_held": self.requests_held}

    # ------------------------------------------------------------ per request
    def _event(self) -> asyncio.Event:
        if self._running is None:
            self._running = asyncio.Event()
            self._running.set()
        return self._running

    def draw_error(self) -> bool:
        """Whether this completion request fails (one seeded draw per request while error_rate > 0)."""
        rate = self.faults.error_rate
        if rate <= 0.0:
            return False
        fail = self._rng.random() < rate
        self.errors_injected += fail
        return fail

    def drop(self, scope: Scope) -> None:
        """Abort the connection that carries `scope`'s request (no response at all)."""
        conn = self._connection_of(scope)
        if conn is not None:
            self.connections_dropped += 1
            conn.transport.abort()

    def _connection_of(self, scope: Scope) -> Any:
        if self._server is None:
            return None
        client = scope.get("client")
        for conn in list(self._server.server_state.connections):
            if getattr(conn, "client", None) == (tuple(client) if client else None):
                return conn
        return None

    def _drop_all(self) -> None:
        if self._server is None:
            return
        for conn in list(self._server.server_state.connections):
            cycle = getattr(conn, "cycle", None)
            path = cycle.scope.get("path", "") if cycle is not None else ""
            if path.startswith(ADMIN_PREFIX) and not getattr(cycle, "response_complete", True):
                continue  # the admin request that asked for the kill still gets its answer
            self.connections_dropped += 1
            conn.transport.abort()

    async def hold(self, receive: Receive) -> Receive | None:
        """Hold a request while the server hangs; a receive that replays its body, or None: drop it.

        None when the client went away meanwhile (nothing to answer) or the server died.
        """
        self.requests_held += 1
        pending: list[Message] = []

        async def until_disconnect() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                pending.append(msg)

        gone = asyncio.ensure_future(until_disconnect())
        healed = asyncio.ensure_future(self._event().wait())
        try:
            await asyncio.wait((gone, healed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            healed.cancel()
        if gone.done() and not gone.cancelled():
            return None
        if self.state is FaultState.KILLED:
            return None

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        return replay

    async def gate(self) -> None:
        """Before a response write: wait while the server hangs."""
        ev = self._event()
        while self.state is FaultState.HUNG:
            await ev.wait()


class FaultMiddleware:
    """ASGI middleware that carries out a `FaultInjector`'s faults in front of an app."""

    def __init__(self, app: Any, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        inj = self.injector
        if inj.state is FaultState.HUNG:
            held = await inj.hold(receive)
            if held is None:
                await _dropped(inj, scope)
                return
            receive = held
        if inj.state is FaultState.KILLED:
            await _dropped(inj, scope)
            return
        if scope["method"] == "POST" and scope["path"] in COMPLETION_PATHS and inj.draw_error():
            await _injected_error(receive, send)
            return

        async def gated_send(msg: Message) -> None:
            if inj.state is not FaultState.OK:
                await inj.gate()
                if inj.state is FaultState.KILLED:
                    # Its connection is gone (dropped by the kill); the app stops at the disconnect.
                    return
            await send(msg)

        await self.app(scope, receive, gated_send)


async def _dropped(inj: FaultInjector, scope: Scope) -> None:
    inj.drop(scope)
    # Let the server see the connection lost before the app returns (else it logs a missing response).
    for _ in range(3):
        await asyncio.sleep(0)


async def _injected_error(receive: Receive, send: Send) -> None:
    import orjson

    msg = await receive()
    while msg.get("more_body"):
        msg = await receive()
    body = orjson.dumps({"error": {"message": "injected fault: internal server error", "type": "InternalServerError",
                                   "param": None, "code": 500}})
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
