"""Emulated engines and live scenarios for tests and benchmarks, all on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
