"""The request record shared by the core, the simulator backend and the live backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulator.prefix import PromptBlocks


@dataclass(slots=True, eq=False)
class Request:
    """One LLM request with its SLO and its lifecycle timestamps (seconds on the backend's clock).

    The scheduler reads the static fields; the backend fills the lifecycle fields.
    """

    request_id: int
    arrival_s: float
    model: str
    slo_class: str
    ttft_slo_s: float
    """Time-to-first-token deadline, relative to arrival."""
    prompt_tokens: int
    output_tokens: int
    """Tokens to generate (max_tokens with ignore_eos in a replay)."""
    tpot_slo_s: float | None = None
    priority: int = 0
    """Lower is more urgent; used by the `priority` baseline (vLLM's convention)."""
    prefix: PromptBlocks | None = None
    """What the prompt shares with others, for prefix caching: its leading blocks' content hashes (a trace's,
    or a shared system prompt's); None: nothing known."""

    # Lifecycle, filled by the backend.
    dispatch_s: float | None = None
    """First time the request was handed to an engine."""
    first_token_s: float | None = None
    finish_s: float | None = None
    instance_id: int | None = None
    generated_tokens: int = 0
    num_preemptions: int = 0
    """Engine-side preemptions (KV cache ran out; recomputed)."""
    num_evictions: int = 0
    """Scheduler-side evictions (QLM moved the request out to make room)."""
    error: str | None = None
    rejected: bool = False
    """Refused at admission (a `Reject` decision); `error` says why."""
    predicted_ttft_s: float | None = None
    """The scheduler's estimate of this request's TTFT (at its estimator percentile), made when it first
    planned the request; None when the policy makes no estimate."""

    @property
    def deadline_s(self) -> float:
        """Absolute time by which the first token is due."""
        return self.arrival_s + self.ttft_slo_s

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.arrival_s

    @property
    def e2el_s(self) -> float | None:
        if self.finish_s is None:
            return None
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """vLLM's TPOT: (E2EL - TTFT) / (output tokens - 1), defined for outputs of 2+ tokens."""
        if self.finish_s is None or self.first_token_s is None or self.generated_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.generated_tokens - 1)

    @property
    def slo_met(self) -> bool:
        """TTFT within its deadline, and TPOT within its deadline where one is set."""
        ttft = self.ttft_s
        if ttft is None or self.finish_s is None or self.error is not None:
            return False
        if ttft > self.ttft_slo_s:
            return False
        if self.tpot_slo_s is not None:
            tpot = self.tpot_s
            if tpot is not None and tpot > self.tpot_slo_s:
                return False
        return True
