"""Event-loop lag: how late an asyncio process's event loop gets round to a task that is due.

Everything the gateway does (parsing requests, relaying every token, scheduling, polling engines) runs
on one asyncio loop, so a busy loop delays all of it, and a client sees the delay as TTFT. A replay client
is one such loop too: the time it takes to read a token it is late with counts in the TTFT it measures. A
monitor task sleeps a fixed interval and records how much later than asked it woke (`loop.time()` based):
that is the time the loop spent on other callbacks before it could run a ready one.
"""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

INTERVAL_S = 0.02
"""The monitor's sleep; short enough to see bursts, long enough to cost nothing (50 wake-ups/s)."""


class LoopLagMonitor:
    """Samples the running loop's lag every `interval_s` while started.

    Args:
        interval_s: How long the monitor sleeps between samples.
        observe: Called with every sample (s), e.g. a Prometheus histogram's `observe`.
        on_window: Called every `window_s` (at the first sample past the window's end) with the largest
            lag in the window (s), e.g. to add it to a timeline.
        window_s: Length of an `on_window` window, wall seconds.
        keep: Keep every sample for `summary()` (off for a server that runs for days).
    """

    def __init__(self, interval_s: float = INTERVAL_S, *, observe: Callable[[float], None] | None = None,
                 on_window: Callable[[float], None] | None = None, window_s: float = 1.0,
                 keep: bool = True) -> None:
        self.interval_s = interval_s
        self._observe = observe
        self._on_window = on_window
        self.window_s = window_s
        self._keep = keep
        self.samples = array("d")
        """Every lag sampled (s), when kept."""
        self.max_s = 0.0
        """The largest lag seen (s), kept or not."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling on the running loop (again after `stop`: samples accumulate)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qlmctl-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval_s
        window_end = loop.time() + self.window_s
        window_max = 0.0
        while True:
            t = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            # The loop may run a timer up to its clock resolution early: never a negative lag.
            lag = max(0.0, now - t - interval)
            if self._keep:
                self.samples.append(lag)
            self.max_s = max(self.max_s, lag)
            if self._observe is not None:
                self._observe(lag)
            window_max = max(window_max, lag)
            if now >= window_end:
                if self._on_window is not None:
                    self._on_window(window_max)
                window_max = 0.0
                window_end = now + self.window_s

    def summary(self, prefix: str = "gateway_loop_lag") -> dict[str, float | None]:
        """p50, p99 and max of the kept samples, in ms (None without samples)."""
        return ms_summary(prefix, self.samples)


def ms_summary(prefix: str, seconds: Any) -> dict[str, float | None]:
    """`<prefix>_p50_ms`, `_p99_ms` and `_max_ms` of `seconds` (a sequence of durations, s); None for none."""
    keys = (f"{prefix}_p50_ms", f"{prefix}_p99_ms", f"{prefix}_max_ms")
    if not len(seconds):
        return dict.fromkeys(keys)
    ms = np.array(seconds, dtype=np.float64) * 1e3  # a copy: a monitor's array keeps growing
    p50, p99 = np.percentile(ms, [50, 99])
    return dict(zip(keys, (float(p50), float(p99), float(ms.max()))))
