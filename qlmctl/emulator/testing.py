"""Emulated engines and live scenarios for tests and benchmarks, all on loopback."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from qlmctl.childproc import stop_child, wait_told
from qlmctl.emulator.server import EmulatorHandle, start_emulator
from simulator.profile import EngineProfile


@contextmanager
def local_emulators(engines: list[tuple[EngineProfile, str]], *, speedup: float = 1.0,
                    **kw: Any) -> Iterator[list[EmulatorHandle]]:
    """Several emulators at once (`start_emulator`, `kw` to it), stopped on exit."""
    started: list[EmulatorHandle] = []
    try:
        for prof, name in engines:
            started.append(start_emulator(prof, name, speedup=speedup, **kw))
        yield started
    finally:
        for e in started:
            e.stop()


@dataclass(frozen=True, slots=True)
class EmulatorAddress:
    """An emulator served by another process (`process_emulators`)."""

    host: str
    port: int
    model: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _serve_emulators(engines: list[tuple[EngineProfile, str]], speedup: float, kw: dict[str, Any],
                     conn: Connection) -> None:
    """The child of `process_emulators`: start the emulators, report their ports, serve until told to stop or
    until the parent's end of the pipe closes (the parent died: nothing is left running)."""
    started = []
    try:
        for prof, name in engines:
            started.append(start_emulator(prof, name, speedup=speedup, **kw))
        conn.send([e.port for e in started])
        wait_told(conn)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        for e in started:
            e.stop()


@contextmanager
def process_emulators(engines: list[tuple[EngineProfile, str]], *, speedup: float = 1.0,
                      startup_timeout_s: float = 60.0, **kw: Any) -> Iterator[list[EmulatorAddress]]:
    """`local_emulators` in a process of their own, as real engines are: their Python work does not share a GIL
    with the caller's (a gateway in the same process as six emulators waited for them: event-loop lag p99
    54-71 ms on an idle 2-core machine). Stopped on exit; the child also stops if this process dies."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and a running loop
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_emulators, args=(engines, speedup, kw, child), daemon=True,
                       name="qlmctl-emulators")
    proc.start()
    child.close()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not parent.poll(0.05):
            if not proc.is_alive():
                raise RuntimeError(f"the emulators' process exited with code {proc.exitcode} before they started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"emulators did not start within {startup_timeout_s:g} s")
        ports = parent.recv()
        if isinstance(ports, str):
            raise RuntimeError(f"emulators did not start: {ports}")
        host = kw.get("host", "127.0.0.1")
        yield [EmulatorAddress(host, port, name) for port, (_, name) in zip(ports, engines)]
    finally:
        stop_child(proc, parent)


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
