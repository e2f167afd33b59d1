"""Emulated engines and live scenarios for tests and benchmarks, all on loopback.

`local_emulator` serves the emulator's ASGI app (`qlmctl.live.emulator.create_app`) with uvicorn on a
background thread, like `emulator.start_emulator`, but lets uvicorn create its listening socket from
host and port. asyncio sets TCP_NODELAY only on sockets created with proto IPPROTO_TCP; a socket made
with `socket.socket(AF_INET, SOCK_STREAM)` (proto 0), handed to uvicorn, serves without it, and every
response written in two parts (headers, then body) then waits ~40 ms for the client's delayed ACK.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from simulator.profile import EngineProfile


@dataclass
class LocalEngine:
    """An emulated vLLM server on a background thread."""

    model: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(1.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5.0)


def start_local_emulator(profile: EngineProfile, name: str, *, speedup: float = 1.0, **kw: Any) -> LocalEngine:
    """Start an emulator for `profile` serving model `name` on 127.0.0.1 (a free port); `kw` go to create_app."""
    import uvicorn

    from qlmctl.live.emulator import create_app

    app = create_app(profile, name, speedup=speedup, **kw)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=1, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"qlmctl-emulator-{name}")
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"emulator for {name} did not start")
        time.sleep(0.002)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LocalEngine(name, port, server, thread)


@contextmanager
def local_emulators(engines: list[tuple[EngineProfile, str]], *, speedup: float = 1.0,
                    **kw: Any) -> Iterator[list[LocalEngine]]:
    """Several emulators at once, stopped on exit."""
    started: list[LocalEngine] = []
    try:
        for prof, name in engines:
            started.append(start_local_emulator(prof, name, speedup=speedup, **kw))
        yield started
    finally:
        for e in started:
            e.stop()


def live_scenario_spec(profile_fields: dict[str, Any], engines: list[tuple[str, str, str]], *,
                       slo_classes: dict[str, dict[str, float]] | None = None, speedup: float = 1.0,
                       workload: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                       **live: Any) -> dict[str, Any]:
    """A scenario dict whose cluster mirrors `engines` [(instance, model, url)]: one profile for every model.

    The first model listed for an instance is the one awake at start.
    """
    models = list(dict.fromkeys(m for _, m, _ in engines))
    instances: dict[str, str] = {}
    for inst, model, _ in engines:
        instances.setdefault(inst, model)
    return {
        "name": "live-test",
        "models": {m: {"profile": dict(profile_fields)} for m in models},
        "cluster": {"instances": [{"name": i, "model": m} for i, m in instances.items()]},
        "slo_classes": slo_classes or {"interactive": {"ttft_s": 5.0}, "batch": {"ttft_s": 600.0}},
        "workload": workload or {"synthetic": {"rate_rps": 1, "num_requests": 1, "prompt_tokens": 8,
                                               "output_tokens": 8}},
        "scheduler": scheduler or {},
        "live": {"engines": [{"instance": i, "model": m, "url": u} for i, m, u in engines], "port": 0,
                 "speedup": speedup, **live},
    }
