"""A live instance (one GPU) and its engines (one server per model it can serve), as the scheduler sees them.

At most one engine of an instance is awake; the others sleep or are stopped, and a `SwapControl` changes
which (`qlmctl.gateway.swap`, or restarts under `--launch`). The instance's load is the gateway's own
count of the requests it sent there, plus what the engine's last metrics poll showed beyond them.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from qlmctl.core.request import Request
from qlmctl.engines.base import EngineKind, EngineMetrics, EngineServer
from qlmctl.scenario import LiveEngineSpec
from simulator.profile import EngineProfile


class SwapControl(Protocol):
    """How an instance changes its awake model: sleep/wake_up (default) or process restarts."""

    warm: bool
    """True when a sleeping model wakes from CPU memory (load_warm_s), False for cold loads."""

    async def release(self, engine: LiveEngine) -> None:
        """Free the GPU of `engine`'s model (sleep, or stop its process)."""

    async def acquire(self, engine: LiveEngine) -> None:
        """Load `engine`'s model on the GPU (wake up, or start its process and wait for health)."""

    def available(self, engine: LiveEngine) -> bool:
        """Whether the engine's server is up (asleep or awake) rather than stopped."""


class Placed(Protocol):
    """A request on an instance, as its bookkeeping sees it (`LiveRequest`)."""

    req: Request
    sent: int
    """Output tokens delivered so far."""
    kv_tokens: int
    """Tokens it counts for in its instance's KV estimate (set by `LiveInstance.add`)."""
    prefill_tokens: int
    """Tokens still to prefill on this attempt (set by `LiveInstance.add`, cleared at its first token)."""


class LiveEngine:
    """One engine server: one model on one instance."""

    def __init__(self, spec: LiveEngineSpec, instance: LiveInstance, server: EngineServer, kind: EngineKind) -> None:
        self.spec = spec
        self.model = spec.model
        self.url = spec.url
        self.instance = instance
        self.server = server
        self.kind = kind
        self.healthy = True
        self.sleeping: bool | None = None
        """Last known sleep state; None when the engine has no sleep endpoints."""
        self.metrics: EngineMetrics | None = None
        self.metrics_at: float | None = None
        # Health (see qlmctl.gateway.health).
        self.fails = 0
        """Consecutive failed requests (since its last first token)."""
        self.poll_fails = 0
        """Consecutive failed /metrics polls."""
        self.ejections = 0
        """Times in a row it was marked unhealthy (its probe backoff)."""
        self.eject_until = 0.0
        """Loop time before which an unhealthy engine is not probed."""

    @property
    def awake(self) -> bool:
        return self.instance.awake == self.model and not self.instance.swapping

    @property
    def in_flight(self) -> int:
        return len(self.instance.inflight) if self.awake else 0

    @property
    def free_kv_blocks(self) -> int:
        return self.instance.free_kv_blocks if self.awake else 0


class LiveInstance:
    """One GPU and its engines, as the scheduler sees it (implements InstanceView)."""

    def __init__(self, instance_id: int, name: str, gpu: str, profiles: dict[str, EngineProfile],
                 control: SwapControl, scheduling_policy: str = "fcfs") -> None:
        self._id = instance_id
        self._scheduling_policy = scheduling_policy
        self.name = name
        self.gpu = gpu
        self.engines: dict[str, LiveEngine] = {}
        self._profiles = profiles
        self._base_profiles = dict(profiles)
        self.control = control
        self.awake: str | None = None
        self._swapping = False
        self.inflight: dict[int, Placed] = {}
        self.kv_tokens = 0
        """Prompt + output tokens (+1 each) of the requests in flight: the gateway's KV estimate."""
        self.prefill_tokens = 0
        """Prompt tokens of the requests in flight that have no first token yet on this attempt."""
        self.ext_requests = 0
        """Requests the engine reported beyond the gateway's own, at the last poll."""
        self.ext_blocks = 0
        self.swaps = 0
        self.evictions = 0
        self.busy_s = 0.0
        self._busy_since: float | None = None
        self.drained = asyncio.Event()
        self.drained.set()

    # ------------------------------------------------------------ InstanceView
    @property
    def instance_id(self) -> int:
        return self._id

    @property
    def model(self) -> str | None:
        return None if self._swapping else self.awake

    @property
    def swapping(self) -> bool:
        return self._swapping

    @property
    def healthy(self) -> bool:
        if self._swapping:
            return True
        if self.awake is None:
            return any(e.healthy for e in self.engines.values())
        return self.engines[self.awake].healthy

    @property
    def profile(self) -> EngineProfile | None:
        m = self.model
        return self._profiles[m] if m is not None else None

    @property
    def num_running(self) -> int:
        return self._total() - self.num_waiting

    @property
    def num_waiting(self) -> int:
        prof = self.profile
        cap = prof.max_num_seqs if prof is not None else 0
        return max(0, self._total() - cap)

    def _total(self) -> int:
        return len(self.inflight) + self.ext_requests

    @property
    def free_kv_blocks(self) -> int:
        prof = self.profile
        if prof is None:
            return 0
        own = self.kv_tokens // prof.block_size + len(self.inflight)  # + 1 a request: partial blocks
        return prof.kv_blocks - own - self.ext_blocks

    @property
    def pending_prefill_tokens(self) -> int:
        return self.prefill_tokens

    @property
    def scheduling_policy(self) -> str:
        return self._scheduling_policy

    def running_requests(self) -> list[Request]:
        return [lr.req for lr in self.inflight.values()]

    def remaining_output_tokens(self) -> int:
        return sum(lr.req.output_tokens - lr.sent for lr in self.inflight.values())

    def profile_for(self, model: str) -> EngineProfile | None:
        return self._profiles.get(model) if model in self.engines else None

    def load_time(self, model: str) -> float:
        """Seconds to swap to `model`: the awake model's sleep (its profile's sleep_s), then `model`'s wake-up
        (load_warm_s); with restart swaps, `model`'s start (load_cold_s)."""
        prof = self.profile_for(model)
        if prof is None:
            return math.inf
        if not self.control.warm:
            return prof.load_cold_s
        cur = self._profiles.get(self.awake) if self.awake is not None and self.awake != model else None
        return prof.load_warm_s + (cur.sleep_s if cur is not None else 0.0)

    # ------------------------------------------------------------ bookkeeping
    def add(self, lr: Placed, now: float) -> None:
        r = lr.req
        lr.kv_tokens = r.prompt_tokens + lr.sent + 1
        self.kv_tokens += lr.kv_tokens
        lr.prefill_tokens = r.prompt_tokens + lr.sent
        self.prefill_tokens += lr.prefill_tokens
        self.inflight[r.request_id] = lr
        self.drained.clear()
        self._update_busy(now)

    def remove(self, lr: Placed, now: float) -> None:
        if self.inflight.pop(lr.req.request_id, None) is None:
            return
        self.kv_tokens -= lr.kv_tokens
        lr.kv_tokens = 0
        self.prefilled(lr)
        if not self.inflight:
            self.drained.set()
        self._update_busy(now)

    def prefilled(self, lr: Placed) -> None:
        """`lr`'s prompt is no longer waiting for prefill here (its first token of the attempt came, or it left)."""
        self.prefill_tokens -= lr.prefill_tokens
        lr.prefill_tokens = 0

    def set_engine_shape(self, model: str, m: EngineMetrics) -> bool:
        """Take the KV cache size the engine reports over the scenario's; True when it changed."""
        base = self._base_profiles[model]
        over: dict[str, int] = {}
        if m.num_gpu_blocks:
            over["kv_blocks"] = m.num_gpu_blocks
        if m.block_size:
            over["block_size"] = m.block_size
        prof = base.with_overrides(**over) if over else base
        if prof == self._profiles[model]:
            return False
        self._profiles[model] = prof
        return True

    def begin_swap(self, now: float) -> None:
        self._swapping = True
        self._update_busy(now)

    def end_swap(self, now: float) -> None:
        self._swapping = False
        self._update_busy(now)

    def _update_busy(self, now: float) -> None:
        busy = bool(self.inflight) or self._swapping
        if busy and self._busy_since is None:
            self._busy_since = now
        elif not busy and self._busy_since is not None:
            self.busy_s += now - self._busy_since
            self._busy_since = None

    def busy_until(self, now: float) -> float:
        return self.busy_s + (now - self._busy_since if self._busy_since is not None else 0.0)
