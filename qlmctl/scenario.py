"""Scenario config: models and their engine profiles, the cluster, SLO classes, workload, scheduler.

Loaded from YAML and validated on load with pydantic; every error names the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model, field_validator,
                      model_validator)

from qlmctl.engine_defaults import ENGINE_FLAGS, canonical_gpu, describe_flags, unknown_gpu_message, vllm_defaults
from qlmctl.engines import ENGINE_KINDS
from qlmctl.errors import UserError
from simulator.profile import EngineProfile


def _repo_root() -> Path:
    """The checkout whose scenarios/ and traces/ the defaults name. In a source checkout (or an editable install) it
    is this package's own parent; a regular install (`pip install .`, the compiled build) leaves those folders behind
    in the checkout, so there it is the checkout the command runs in (the current directory or one above it)."""
    src = Path(__file__).resolve().parent.parent
    cwd = Path.cwd()
    for d in (src, cwd, *cwd.parents):
        if (d / "scenarios" / "default.yaml").is_file():
            return d
    return src


REPO_ROOT = _repo_root()
DEFAULT_SCENARIO = REPO_ROOT / "scenarios" / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MeasuredFlagsSpec(_Strict):
    """The engine flags a profile was measured with (`qlmctl profile-model` records them): what it assumes.

    Not the flags a simulated engine runs with: those come from the scenario (`cluster.instances[].engine`),
    else vLLM's defaults for the GPU. Where they differ, the scenario says so when it is loaded."""

    max_num_seqs: int | None = Field(default=None, gt=0, description="--max-num-seqs")
    max_num_batched_tokens: int | None = Field(default=None, gt=0, description="--max-num-batched-tokens")
    max_model_len: int | None = Field(default=None, gt=0, description="--max-model-len")
    block_size: int | None = Field(default=None, gt=0, description="--block-size")
    enable_prefix_caching: bool | None = Field(default=None, description="--enable-prefix-caching")
    api_server_count: int | None = Field(default=None, ge=1, description="--api-server-count")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="--gpu-memory-utilization")
    async_scheduling: bool | None = Field(default=None, description="asynchronous scheduling on")
    command: str | None = Field(default=None, description="the engine's command line, as given")


class _ProfileFields(_Strict):
    """The base of `ProfileSpec`: what a profile section does besides holding its fields.

    `block_size`, `max_num_seqs`, `max_num_batched_tokens`, `max_model_len`, `api_server_count` and
    `enable_prefix_caching` given in a profile pin the engine's setting for this model (a scenario's
    `cluster.instances[].engine` still overrides them); left out, the engine runs with vLLM's default for its
    GPU. `engine_flags` records what the profile was measured with."""

    def to_profile(self, model: str) -> EngineProfile:
        data = self.model_dump(exclude={"provenance", "engine_flags"})
        return EngineProfile(model=model, **data)

    def pinned_flags(self) -> dict[str, Any]:
        """The engine flags this profile sets explicitly (see the class docstring)."""
        return {k: getattr(self, k) for k in ENGINE_FLAGS if k in self.model_fields_set and hasattr(self, k)}

    def measured_flags(self) -> dict[str, Any]:
        """The flags it was measured with (`engine_flags`, else what its provenance's `flags` line says)."""
        if self.engine_flags is not None:
            return {k: v for k, v in self.engine_flags.model_dump().items() if v is not None and k != "command"}
        return flags_from_command(str((self.provenance or {}).get("flags") or ""))


_FLAG_OPTIONS = {
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--max-model-len": ("max_model_len", int),
    "--block-size": ("block_size", int),
    "--api-server-count": ("api_server_count", int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),
}


def flags_from_command(text: str) -> dict[str, Any]:
    """The engine flags a `vllm serve` command line sets (`--max-num-seqs 256`, `--no-enable-prefix-caching`)."""
    out: dict[str, Any] = {}
    words = text.replace("=", " ").split()
    for i, w in enumerate(words):
        if w in _FLAG_OPTIONS and i + 1 < len(words):
            name, cast = _FLAG_OPTIONS[w]
            try:
                out[name] = cast(words[i + 1])
            except ValueError:
                pass
        elif w == "--enable-prefix-caching":
            out["enable_prefix_caching"] = True
        elif w == "--no-enable-prefix-caching":
            out["enable_prefix_caching"] = False
    return out


def _profile_fields() -> dict[str, Any]:
    """`ProfileSpec`'s fields, from `EngineProfile`'s: their types and defaults, and the description and bounds
    each declares in its metadata (see `simulator.profile.param`). `model` is the scenario's key instead."""
    hints = get_type_hints(EngineProfile)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(EngineProfile):
        if f.name == "model":
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else meta["file_default"]
        bounds = {k: meta[k] for k in ("gt", "ge") if meta[k] is not None}
        out[f.name] = (hints[f.name], Field(... if default is dataclasses.MISSING else default,
                                           description=meta["doc"], **bounds))
    return out


ProfileSpec = create_model(
    "ProfileSpec", __base__=_ProfileFields, __module__=__name__,
    __doc__="An engine timing profile (simulator.profile.EngineProfile's fields; see there for the step-cost "
            "form), with where its figures come from (`provenance`, free-form).",
    **_profile_fields(),
    engine_flags=(MeasuredFlagsSpec | None, Field(
        None, description="the engine flags the profile was measured with (shown, and compared with the flags a "
                          "scenario runs the engine with)")),
    provenance=(dict[str, Any] | None, None),
)


class ModelSpec(_Strict):
    """A model: either a full profile, a profile file, or the prototype's token throughput."""

    profile: ProfileSpec | None = None
    profile_file: str | None = None
    token_throughput: float | None = Field(default=None, gt=0, description="output tokens/s")
    by_gpu: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per GPU type, fields that override the profile."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [x is not None for x in (self.profile, self.profile_file, self.token_throughput)]
        if sum(given) != 1:
            raise ValueError("give exactly one of profile, profile_file, token_throughput")
        return self


class EngineFlagsSpec(_Strict):
    """The engine server's flags on an instance (vLLM's), as far as the simulator models them.

    A flag left out takes the profile's setting if it pins one, else vLLM's default on the instance's GPU
    (`qlmctl.engine_defaults`): on an H100/H200-class GPU max_num_seqs 1024, max_num_batched_tokens 8192;
    block_size 16, prefix caching on and one API server everywhere."""

    scheduling_policy: Literal["fcfs", "priority"] | None = Field(
        default=None,
        description="vLLM's --scheduling-policy; default: what the policy asks for (priority for the `priority` "
                    "baseline, fcfs otherwise)")
    max_num_seqs: int | None = Field(default=None, gt=0, description="vLLM's --max-num-seqs: sequences per batch")
    max_num_batched_tokens: int | None = Field(
        default=None, gt=0, description="vLLM's --max-num-batched-tokens: tokens per engine step (chunked prefill)")
    max_model_len: int | None = Field(
        default=None, gt=0, description="vLLM's --max-model-len: longest prompt + output; default: the profile's")
    block_size: Literal[1, 8, 16, 32, 64, 128] | None = Field(
        default=None, description="vLLM's --block-size: tokens per KV block (the KV memory stays the same)")
    enable_prefix_caching: bool | None = Field(
        default=None, description="vLLM's --enable-prefix-caching (default on); read by the engine model")
    api_server_count: int | None = Field(
        default=None, ge=1, description="vLLM's --api-server-count: API server processes sharing the requests")


class InstanceSpec(_Strict):
    name: str | None = None
    count: int = Field(default=1, gt=0, description="replicas of this line")
    gpu: str = "H200"
    model: str | None = Field(default=None, description="model loaded at start")
    profile_overrides: dict[str, Any] = Field(default_factory=dict)
    engine: EngineFlagsSpec = Field(default_factory=EngineFlagsSpec)


class ClusterSpec(_Strict):
    instances: list[InstanceSpec] = Field(min_length=1)
    first_load: Literal["warm", "cold"] = Field(
        default="warm",
        description="how an instance first loads a model: warm, as `qlmctl serve --launch` with sleep mode starts "
                    "the engines (each loaded, then put to sleep but the instance's own), so every swap is a "
                    "wake-up (load_warm_s); cold, each model's first load on an instance starts its engine "
                    "(load_cold_s), as without sleep mode. Either way a swap first puts the model it leaves "
                    "to sleep (its sleep_s)")


class SLOClassSpec(_Strict):
    ttft_s: float = Field(gt=0, description="time-to-first-token deadline, s")
    tpot_s: float | None = Field(default=None, gt=0, description="time-per-output-token deadline, s")
    priority: int | None = Field(default=None, description="vLLM priority (lower first); default by ttft")
    weight: float = Field(default=1.0, gt=0, description="worth of one request of this class met on time "
                                                         "(scheduler.objective: weighted)")


class MappingSpec(_Strict):
    """How trace rows get a model or an SLO class: a column, a constant, or a seeded random split."""

    column: str | None = None
    constant: str | None = None
    split: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> "MappingSpec":
        if sum(x is not None for x in (self.column, self.constant, self.split)) != 1:
            raise ValueError("give exactly one of column, constant, split")
        if self.split is not None:
            if any(v < 0 for v in self.split.values()) or sum(self.split.values()) <= 0:
                raise ValueError("split weights must be non-negative and not all zero")
            total = sum(self.split.values())
            fractions = any(float(v) != int(v) for v in self.split.values())
            if fractions and abs(total - 1.0) > 1e-3:
                raise ValueError(f"split fractions sum to {total:g}, not 1: give fractions that sum to 1, or "
                                 f"whole-number weights (e.g. {{a: 3, b: 7}})")
        return self


class SyntheticSpec(_Strict):
    arrival: Literal["poisson", "gamma"] = "poisson"
    rate_rps: float = Field(gt=0, description="mean arrival rate, requests/s")
    cv: float = Field(default=1.0, gt=0, description="coefficient of variation of gaps (gamma)")
    num_requests: int = Field(gt=0)
    lengths_from: str | None = Field(default=None, description="trace whose token lengths are resampled")
    prompt_tokens: int | None = Field(default=None, gt=0, description="fixed prompt length")
    output_tokens: int | None = Field(default=None, gt=0, description="fixed output length")


class LengthDistSpec(_Strict):
    """Token lengths drawn from a log-normal distribution with this mean and coefficient of variation."""

    mean: float = Field(gt=0, description="mean length, tokens")
    cv: float = Field(default=0.0, ge=0, description="standard deviation / mean (0: every length is the mean)")
    min: int = Field(default=1, ge=1, description="shortest length, tokens")
    max: int | None = Field(default=None, ge=1, description="longest length, tokens")


class ClassLengthsSpec(_Strict):
    """One SLO class's own token lengths: resampled from a trace, or drawn from distributions."""

    lengths_from: str | None = Field(default=None, description="trace whose (prompt, output) pairs are resampled")
    prompt: LengthDistSpec | None = None
    output: LengthDistSpec | None = None

    @model_validator(mode="after")
    def _source(self) -> "ClassLengthsSpec":
        if (self.lengths_from is None) == (self.prompt is None or self.output is None):
            raise ValueError("give lengths_from, or both prompt and output (and not both forms)")
        return self


class SharedPrefixSpec(_Strict):
    """A share of the requests begin with one of a few system prompts (what vLLM's prefix cache reuses)."""

    tokens: int = Field(gt=0, description="length of each system prompt, tokens")
    fraction: float = Field(default=1.0, gt=0, le=1, description="share of the requests that begin with one")
    variants: int = Field(default=1, gt=0, description="distinct system prompts, each as likely")


class WorkloadSpec(_Strict):
    trace: str | None = None
    format: str = "auto"
    synthetic: SyntheticSpec | None = None
    model: MappingSpec | None = None
    slo_class: MappingSpec | None = None
    time_scale: float = Field(default=1.0, gt=0, description="multiply inter-arrival times by this")
    target_rate_rps: float | None = Field(default=None, gt=0, description="rescale arrivals to this rate")
    start_s: float = Field(default=0.0, ge=0, description="skip the trace before this offset, s")
    max_requests: int | None = Field(default=None, gt=0)
    burstiness: float | None = Field(
        default=None, gt=0,
        description="replace the arrival times by a gamma process of this shape at the target rate (as vllm bench "
                    "serve --burstiness: 1 is Poisson, lower is burstier; coefficient of variation 1/sqrt(B))")
    duration_s: float | None = Field(
        default=None, gt=0,
        description="arrivals span this long: a trace (after start_s, max_requests and rescaling) is repeated end "
                    "to end to fill it and cut at it; a synthetic workload arrives until it (num_requests ignored)")
    lengths_by_class: dict[str, ClassLengthsSpec] = Field(
        default_factory=dict, description="per SLO class, token lengths that replace the trace's")
    shared_prefix: SharedPrefixSpec | None = Field(
        default=None, description="prompts that begin with a shared system prompt (for prefix caching; a trace "
                                  "with block hashes, as Mooncake's, brings its own sharing)")

    @model_validator(mode="after")
    def _source(self) -> "WorkloadSpec":
        if (self.trace is None) == (self.synthetic is None):
            raise ValueError("give exactly one of trace, synthetic")
        if self.target_rate_rps is not None and self.time_scale != 1.0:
            raise ValueError("give at most one of time_scale, target_rate_rps")
        if self.target_rate_rps is not None and math.isnan(self.target_rate_rps):
            raise ValueError("target_rate_rps: not a number")
        return self


class SchedulerSpec(_Strict):
    policy: str = "qlm"
    slo_bucket_s: float = Field(default=10.0, gt=0, description="width of the deadline bucket for grouping, s")
    percentile: float = Field(default=0.9, gt=0.5, lt=1.0, description="RWT estimator percentile")
    reschedule_interval_s: float = Field(default=1.0, gt=0, description="at most one global reorder per interval, s")
    dispatch_limit: int = Field(default=0, ge=0, description="requests queued inside an engine beyond its batch (0: none)")
    enable_eviction: bool = True
    enable_swap: bool = True
    solver: Literal["auto", "gurobi", "highs"] = "auto"
    solver_time_limit_s: float = Field(default=0.5, gt=0)
    gurobi: dict[str, str] | None = Field(default=None, repr=False, description="licence settings; never printed")
    params: dict[str, Any] = Field(default_factory=dict, description="policy-specific parameters")
    objective: Literal["most", "weighted", "strict"] = Field(
        default="most",
        description="what qlm maximises: most requests within SLO (the paper's), the sum of class weights met "
                    "(slo_classes.*.weight), or strict class precedence (a tighter TTFT class is never given up "
                    "for a looser one)")
    admission: Literal["off", "reject"] = Field(
        default="off", description="qlm: refuse at arrival a request predicted to miss its SLO (429 live)")
    prefill_lookahead_steps: float = Field(
        default=2.0, gt=0,
        description="qlm keeps at most this many engine steps of prefill tokens (max_num_batched_tokens each) "
                    "inside an engine; the rest waits in qlm's queues, where it can still be reordered")


class LiveEngineSpec(_Strict):
    """One engine server the gateway sends requests to (`qlmctl serve`): one model on one GPU."""

    instance: str = Field(description="the GPU (serving instance) this engine runs on; engines sharing it swap")
    model: str = Field(description="model it serves (a key of models); also the served model name")
    url: str = Field(description="base URL, e.g. http://127.0.0.1:8001")
    kind: str = Field(default="vllm", description="engine server kind: how the gateway talks to it and launches it "
                                                  "(qlmctl.engines.ENGINE_KINDS; the emulator is vllm)")
    gpu: str = Field(default="H200", description="GPU type, for the profile's by_gpu overrides")
    device: int | None = Field(default=None, ge=0, description="CUDA device index for --launch; default: instance order")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith("http://"):
            raise ValueError(f"url must be http://host:port (engines speak plain HTTP), got '{v}'")
        return v.rstrip("/")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in ENGINE_KINDS:
            raise ValueError(f"unknown engine kind '{v}'; known: {', '.join(ENGINE_KINDS)}")
        return v


class LaunchSpec(_Strict):
    """How `qlmctl serve --launch` starts the engines: one process per `live.engines` entry."""

    command: str = Field(
        description="command template: {model}, {port}, {gpu} (device index), {name}, {speedup}, {python}, {scenario}"
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every engine process")
    sleep_mode: bool = Field(default=True, description="engines sharing a GPU swap by sleep/wake_up; else by restart")
    health_timeout_s: float = Field(default=900.0, gt=0, description="how long to wait for /health, s")


class ApiKeySpec(_Strict):
    """One client API key of the gateway and what its requests may ask for (docs/robustness.md)."""

    key: SecretStr = Field(repr=False, description="the key: clients send `Authorization: Bearer <key>`")
    name: str | None = Field(default=None, description="a label for logs and /metrics (never the key)")
    slo_classes: list[str] | None = Field(
        default=None, description="SLO classes its requests may name (`custom`: their own TTFT deadline); none: all")
    min_ttft_s: float | None = Field(
        default=None, gt=0, description="the tightest TTFT deadline its requests may have (by class or their own), s")
    default_slo_class: str | None = Field(
        default=None, description="class of its requests that name none (default: live.default_slo_class)")

    @field_validator("key")
    @classmethod
    def _key(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 8:
            raise ValueError("an API key must have at least 8 characters")
        return v


class LiveSpec(_Strict):
    """The live gateway (`qlmctl serve`): its engines and its HTTP settings."""

    engines: list[LiveEngineSpec] = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="gateway port (0: any free port)")
    default_slo_class: str | None = Field(default=None, description="SLO class of requests that name none")
    speedup: float = Field(
        default=1.0, gt=0,
        description="gateway clock rate vs the wall clock; set to the emulated engines' speed-up (1 for vLLM)",
    )
    metrics_interval_s: float = Field(default=0.5, gt=0, description="engine /metrics poll period, wall s")
    resume: Literal["continue", "restart"] = Field(
        default="continue", description="after an eviction: continue from the tokens sent, or regenerate and skip them"
    )
    token_count: Literal["usage", "chunks"] = Field(
        default="usage",
        description="how the gateway counts streamed tokens: the engine's cumulative usage in every chunk "
                    "(exact; vLLM's continuous_usage_stats), or one per chunk with text (cheaper)",
    )
    tokenizer: str = Field(
        default="auto",
        description="where prompt token counts come from (docs/live.md): auto (the engine's model folder with "
                    "Hugging Face tokenizers/transformers, else the engine's POST /tokenize, else words), words, "
                    "engine, or a tokenizer folder or tokenizer.json ({model}: the model's name)")
    max_connections: int = Field(default=4096, gt=0, description="HTTP connections per engine")
    launch: LaunchSpec | None = None
    # Faults (docs/robustness.md). Timeouts and probe periods are wall-clock seconds.
    max_retries: int = Field(
        default=2, ge=0, description="times a request goes back to its queue after its engine failed it; then a 502")
    first_token_timeout_s: float = Field(
        default=300.0, gt=0, description="an engine attempt without a first token this long is hung, wall s")
    inter_token_timeout_s: float = Field(
        default=60.0, gt=0, description="an engine stream without a token this long is hung, wall s")
    unhealthy_after: int = Field(
        default=3, ge=1,
        description="consecutive failed polls or 5xx answers after which an engine is unhealthy "
                    "(a lost connection or a hung stream: at once)")
    probe_interval_s: float = Field(default=1.0, gt=0, description="period of /health probes of an unhealthy engine, wall s")
    probe_timeout_s: float = Field(default=2.0, gt=0, description="timeout of a /health probe or /metrics poll, wall s")
    unavailable_timeout_s: float = Field(
        default=30.0, gt=0,
        description="requests of a model no healthy engine has served for this long fail with 503, wall s")
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long queued and running requests may still finish, wall s")
    # Load and clients.
    queue_limit: int | None = Field(
        default=None, ge=1, description="most requests waiting in the gateway per SLO class (beyond: 429); none: no limit")
    queue_limits: dict[str, int] = Field(default_factory=dict, description="per-SLO-class limits, over queue_limit")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 429 or 503 answer, s")
    max_body_bytes: int = Field(default=32 << 20, gt=0, description="largest request body accepted (beyond: 413), bytes")
    max_body_bytes_in_flight: int = Field(
        default=512 << 20, gt=0,
        description="memory all request bodies held at once may take (each counts its size as received plus as "
                    "parsed); beyond: 503, bytes")
    max_client_body_bytes_in_flight: int = Field(
        default=128 << 20, gt=0, description="the same per client address (beyond: 429), bytes")
    forward_fields: list[str] = Field(
        default_factory=list,
        description="body fields forwarded to the engines beyond those of vLLM's completion and chat APIs "
                    "(others are dropped and named in the x-qlm-ignored-fields response header)")
    api_key: SecretStr | None = Field(
        default=None, description="clients must send `Authorization: Bearer <key>` (env QLMCTL_API_KEY also sets it)")
    api_keys: list[ApiKeySpec] = Field(
        default_factory=list, description="several client keys, each with the SLO classes and tightest deadline it "
                                          "may use (with api_key: one more key without limits)")
    # Client connections (qlmctl/gateway/clientconn.py). Wall seconds.
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection must send its request headers within this of its accept "
                                        "(or of its next request's first byte); then 408 and closed, s")
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="a request body must arrive within this of its headers; then 408 and closed, s")
    idle_timeout_s: float = Field(
        default=30.0, gt=0, description="a kept-alive connection may wait this long for its next request, s")
    send_timeout_s: float = Field(
        default=60.0, gt=0, description="a client that reads nothing of its answer this long is disconnected, s")
    max_client_connections: int | None = Field(
        default=None, ge=1, description="client connections open at once (beyond: the oldest idle or half-open one "
                                        "is closed, else 503); default: 3/4 of the file-descriptor limit")
    log_interval_s: float = Field(
        default=10.0, gt=0, description="repeated events (timeouts, refusals, ignored fields) are logged as one "
                                        "line of totals per interval, s")
    # Outlier ejection (qlmctl/gateway/health.py).
    outlier_error_rate: float = Field(
        default=0.25, gt=0, le=1,
        description="an engine whose attempts fail at this rate or more (over outlier_interval_s, at least "
                    "outlier_min_requests of them) is ejected for outlier_ejection_s")
    outlier_min_requests: int = Field(default=10, ge=1, description="attempts an engine needs in the window before "
                                                                   "its error rate is judged")
    outlier_interval_s: float = Field(default=10.0, gt=0, description="the error-rate window, wall s")
    outlier_ejection_s: float = Field(
        default=30.0, gt=0, description="how long an engine ejected for its error rate takes no requests (doubling "
                                        "with each ejection in a row, up to 8 times), wall s")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str) -> str:
        if v in ("auto", "words", "engine") or "{model}" in v:  # a path per model is checked at start
            return v
        if not Path(v).expanduser().exists():
            raise ValueError(f"tokenizer must be auto, words, engine, or a tokenizer folder or tokenizer.json that "
                             f"exists; '{v}' is none of these")
        return v

    @field_validator("forward_fields")
    @classmethod
    def _forward(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or name in ("slo_class", "slo_ttft_s"):
                raise ValueError(f"forward_fields: '{name}' cannot be forwarded (the SLO fields are the gateway's)")
        return v

    @field_validator("queue_limits")
    @classmethod
    def _limits(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in v.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"queue_limits.{k} must be a positive integer, got {n!r}")
        return v

    @model_validator(mode="after")
    def _engines(self) -> "LiveSpec":
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(self.engines):
            if (e.instance, e.model) in seen:
                raise ValueError(f"engines.{i}: instance '{e.instance}' lists model '{e.model}' twice")
            seen.add((e.instance, e.model))
        return self


class ScenarioSpec(_Strict):
    name: str = "scenario"
    description: str = ""
    seed: int = 0
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    token_throughput: dict[str, float] = Field(default_factory=dict)
    """The public prototype's simple form: model -> output tokens/s."""
    cluster: ClusterSpec
    slo_classes: dict[str, SLOClassSpec] = Field(min_length=1)
    workload: WorkloadSpec
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    live: LiveSpec | None = None

    @field_validator("token_throughput")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if x <= 0:
                raise ValueError(f"token throughput of {k} must be positive")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "ScenarioSpec":
        names = set(self.models) | set(self.token_throughput)
        if not names:
            raise ValueError("no models: give models or token_throughput")
        for c in self.workload.lengths_by_class:
            if c not in self.slo_classes:
                raise ValueError(f"workload.lengths_by_class.{c}: unknown SLO class '{c}'")
        for i, inst in enumerate(self.cluster.instances):
            if inst.model is not None and inst.model not in names:
                raise ValueError(f"cluster.instances.{i}.model: unknown model '{inst.model}'")
        by_gpu = {g for m in self.models.values() for g in m.by_gpu}
        gpus = [(f"cluster.instances.{i}.gpu", inst.gpu) for i, inst in enumerate(self.cluster.instances)]
        gpus += [(f"live.engines.{i}.gpu", e.gpu) for i, e in enumerate(self.live.engines)] if self.live else []
        for where, gpu in gpus:
            if canonical_gpu(gpu) is None and gpu not in by_gpu:
                raise ValueError(f"{where}: {unknown_gpu_message(gpu, by_gpu)}")
        return self

    @model_validator(mode="after")
    def _live_refs(self) -> "ScenarioSpec":
        if self.live is None:
            return self
        names = set(self.models) | set(self.token_throughput)
        for i, e in enumerate(self.live.engines):
            if e.model not in names:
                raise ValueError(f"live.engines.{i}.model: unknown model '{e.model}'")
        d = self.live.default_slo_class
        if d is not None and d not in self.slo_classes:
            raise ValueError(f"live.default_slo_class: unknown SLO class '{d}'")
        for k in self.live.queue_limits:
            if k not in self.slo_classes and k != "custom":
                raise ValueError(f"live.queue_limits.{k}: unknown SLO class '{k}' (known: "
                                 f"{', '.join([*self.slo_classes, 'custom'])})")
        classes = self.slo_classes
        gateway_default = d or max(classes, key=lambda k: classes[k].ttft_s)
        seen: set[str] = set()
        for i, key in enumerate(self.live.api_keys):
            where = f"live.api_keys.{i}"
            value = key.key.get_secret_value()
            if value in seen or (self.live.api_key is not None and value == self.live.api_key.get_secret_value()):
                raise ValueError(f"{where}.key: the same key is listed twice")
            seen.add(value)
            for c in key.slo_classes or ():
                if c not in classes and c != "custom":
                    raise ValueError(f"{where}.slo_classes: unknown SLO class '{c}' (known: "
                                     f"{', '.join([*classes, 'custom'])})")
            default = key.default_slo_class or gateway_default
            if key.default_slo_class is not None and key.default_slo_class not in classes:
                raise ValueError(f"{where}.default_slo_class: unknown SLO class '{default}'")
            allowed = key.slo_classes is None or default in key.slo_classes
            if not allowed or (key.min_ttft_s is not None and classes[default].ttft_s < key.min_ttft_s):
                raise ValueError(f"{where}: the key may not use its default SLO class '{default}'; set "
                                 "default_slo_class to one it may use")
        return self


class Scenario:
    """A validated scenario with its profiles resolved, ready to run."""

    def __init__(self, spec: ScenarioSpec, path: Path | None = None) -> None:
        self.spec = spec
        self.path = path
        self.base_dir = path.parent if path is not None else Path.cwd()
        self._profiles: dict[str, EngineProfile] = {}
        self._by_gpu: dict[str, dict[str, dict[str, Any]]] = {}
        self._pinned: dict[str, dict[str, Any]] = {}
        """Per model, the engine flags its profile pins (see ProfileSpec)."""
        self._measured: dict[str, dict[str, Any]] = {}
        """Per model, the engine flags its profile was measured with (empty: not recorded)."""
        self._profile_source: dict[str, str] = {}
        for name, tps in spec.token_throughput.items():
            self._profiles[name] = EngineProfile.from_token_throughput(name, tps)
            self._pinned[name] = {"max_num_seqs": self._profiles[name].max_num_seqs}  # part of its throughput
            self._profile_source[name] = "token_throughput"
        for name, m in spec.models.items():
            self._profiles[name] = self._resolve_model(name, m)
            self._by_gpu[name] = m.by_gpu

    @property
    def models(self) -> list[str]:
        return list(self._profiles)

    def usage_in_every_chunk(self) -> bool:
        """Whether the gateway asks its engines for the usage in every streamed chunk (`live.token_count: usage`, the
        default, also without a live section): their API servers then spend `frontend_usage_cpu_per_token_s` more
        a token (`EngineProfile.with_usage_stats`), live as simulated."""
        live = self.spec.live
        return live is None or live.token_count == "usage"

    def resolve_path(self, p: str) -> Path:
        """A path in the scenario: relative to the scenario file, else to the cwd, else to the repo."""
        cand = Path(p)
        if cand.is_absolute():
            return cand
        for base in (self.base_dir, Path.cwd(), REPO_ROOT):
            if (base / cand).exists():
                return base / cand
        return self.base_dir / cand

    def _resolve_model(self, name: str, m: ModelSpec) -> EngineProfile:
        if m.token_throughput is not None:
            self._pinned[name] = {"max_num_seqs": 256}  # part of what its throughput means
            self._profile_source[name] = "token_throughput"
            return EngineProfile.from_token_throughput(name, m.token_throughput)
        if m.profile is not None:
            spec = m.profile
            self._profile_source[name] = f"models.{name}.profile"
        else:
            assert m.profile_file is not None
            path = self.resolve_path(m.profile_file)
            spec = _load_yaml_model(path, ProfileSpec, where=f"models.{name}.profile_file")
            self._profile_source[name] = m.profile_file
        self._pinned[name] = spec.pinned_flags()
        self._measured[name] = spec.measured_flags()
        return spec.to_profile(name)

    def _instance_for(self, model: str, gpu: str | None) -> InstanceSpec | None:
        """The cluster line a model's profile stands for when no instance is named: the first that loads the
        model (on `gpu`, if given), else the first on `gpu`, else the first."""
        lines = self.spec.cluster.instances
        for ok in (lambda i: i.model == model and (gpu is None or i.gpu == gpu),
                   lambda i: gpu is None or i.gpu == gpu, lambda i: True):
            for inst in lines:
                if ok(inst):
                    return inst
        return None

    def engine_flags(self, model: str, gpu: str | None = None,
                     engine: EngineFlagsSpec | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        """The engine flags `model` runs with on `gpu` under `engine`, and where each comes from.

        Each flag of `ENGINE_FLAGS`: the scenario's (`engine`), else the profile's pin (its file, or the
        model's by_gpu for `gpu`), else vLLM's default on `gpu`; `max_model_len` has no default here (vLLM
        reads the model's config): the profile's. Returns ({flag: value}, {flag: "scenario" | "profile" |
        "vLLM default on <gpu>"})."""
        pinned = dict(self._pinned.get(model, {}))
        if gpu is not None:
            pinned.update({k: v for k, v in self._by_gpu.get(model, {}).get(gpu, {}).items() if k in ENGINE_FLAGS})
        defaults = vllm_defaults(gpu)
        given = engine.model_dump(exclude_none=True) if engine is not None else {}
        flags: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for k in ENGINE_FLAGS:
            if k in given:
                flags[k], origin[k] = given[k], "scenario"
            elif k in pinned:
                flags[k], origin[k] = pinned[k], "profile"
            elif k in defaults:
                flags[k], origin[k] = defaults[k], f"vLLM default on {gpu or 'an unnamed GPU'}"
            else:
                flags[k], origin[k] = getattr(self._profiles[model], k), "profile"
        return flags, origin

    def profile(self, model: str, gpu: str | None = None, overrides: dict[str, Any] | None = None,
                engine: EngineFlagsSpec | None = None) -> EngineProfile:
        """`model`'s profile on an instance: its by_gpu fields for `gpu`, the engine flags it runs with
        (`engine_flags`), then `overrides` (an instance's profile_overrides).

        Without `engine`, the engine flags of the model's first cluster line (on `gpu`, if given) apply: what
        a policy's estimator or the gateway assume when no instance is named."""
        prof = self._profiles[model]
        fields: dict[str, Any] = {}
        flags_gpu = gpu
        if gpu is not None:
            fields.update(self._by_gpu.get(model, {}).get(gpu, {}))
        if engine is None:
            inst = self._instance_for(model, gpu)
            if inst is not None:
                engine = inst.engine
                flags_gpu = gpu or inst.gpu
        flags, _ = self.engine_flags(model, flags_gpu, engine)
        block = int(fields.get("block_size", prof.block_size))
        kv_blocks = int(fields.get("kv_blocks", prof.kv_blocks))
        if flags["block_size"] != block:  # the same KV memory in blocks of another size
            fields["kv_blocks"] = max(1, kv_blocks * block // flags["block_size"])
        fields.update(flags)
        fields.update(overrides or {})
        try:
            prof = prof.with_overrides(**fields)
        except TypeError as e:
            raise UserError(f"bad profile override: {e}", self.path, field=f"models.{model}") from None
        return prof

    def _engine_lines(self) -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
        """(model, gpu, flags, origin) for each distinct engine the cluster runs."""
        out, seen = [], set()
        for inst in self.spec.cluster.instances:
            for model in [inst.model] if inst.model is not None else self.models:
                flags, origin = self.engine_flags(model, inst.gpu, inst.engine)
                key = (model, inst.gpu, tuple(flags.items()))
                if key not in seen:
                    seen.add(key)
                    out.append((model, inst.gpu, flags, origin))
        return out

    def engine_notes(self) -> list[str]:
        """One line per distinct engine (model, GPU, flags) of the cluster: the flags it runs with."""
        return [f"engine {model} on {gpu}: {describe_flags(flags)}" for model, gpu, flags, _ in self._engine_lines()]

    def engine_mismatches(self) -> list[str]:
        """One warning per engine whose flags differ from those its profile was measured with."""
        out = []
        for model, gpu, flags, origin in self._engine_lines():
            measured = self._measured.get(model, {})
            differ = [k for k, v in measured.items() if k in flags and flags[k] != v]
            if not differ:
                continue
            runs = ", ".join(f"{describe_flags({k: flags[k]})} ({'vLLM default' if origin[k].startswith('vLLM') else origin[k]})"
                             for k in differ)
            out.append(f"{model} on {gpu}: its profile ({self._profile_source.get(model, 'inline')}) was measured "
                       f"with {describe_flags({k: measured[k] for k in differ})}, the engine runs with {runs}; "
                       f"timings outside what was measured are extrapolated (set cluster.instances[].engine to "
                       f"match the measurement)")
        return out

    def instance_specs(self) -> list[tuple[str, InstanceSpec]]:
        """Expand `count` into one (name, spec) per instance."""
        out: list[tuple[str, InstanceSpec]] = []
        for inst in self.spec.cluster.instances:
            for j in range(inst.count):
                base = inst.name or f"{inst.gpu.lower()}-{len(out)}"
                out.append((base if inst.count == 1 else f"{base}-{j}", inst))
        return out

    def slo_priority(self, slo_class: str) -> int:
        cls = self.spec.slo_classes[slo_class]
        if cls.priority is not None:
            return cls.priority
        order = sorted(self.spec.slo_classes, key=lambda k: self.spec.slo_classes[k].ttft_s)
        return order.index(slo_class)

    def dump(self) -> dict[str, Any]:
        """The resolved scenario, without secrets, for the output folder."""
        data = self.spec.model_dump(mode="json")
        if data.get("scheduler", {}).get("gurobi"):
            data["scheduler"]["gurobi"] = {k: "***" for k in data["scheduler"]["gurobi"]}
        data["resolved_profiles"] = {
            m: {k: getattr(p, k) for k in p.__dataclass_fields__} for m, p in
            ((m, self.profile(m)) for m in self._profiles)
        }
        engines = []
        for name, inst in self.instance_specs():
            for model in [inst.model] if inst.model is not None else self.models:
                flags, origin = self.engine_flags(model, inst.gpu, inst.engine)
                engines.append({"instance": name, "gpu": inst.gpu, "model": model, "flags": flags,
                                "origin": origin, "profile_measured_with": self._measured.get(model) or None})
        data["resolved_engines"] = engines
        return data


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; UserError (file, line) when it cannot be read or parsed."""
    return _read_yaml(path)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError("file not found", path) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", path, line) from None


def _load_yaml_model(path: Path, model: type[BaseModel], where: str | None = None) -> Any:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise UserError("expected a mapping at the top level", path, field=where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = _format_loc(err["loc"]) or where
        line = _line_of(path, err["loc"])
        raise UserError(err["msg"], path, line, field) from None


def _line_of(path: Path, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line of a key path in a YAML file, via the composed node tree."""
    try:
        node = yaml.compose(path.read_text())
    except Exception:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(key):
                    nxt, line = v, k.start_mark.line + 1
                    break
            if nxt is None:
                return line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_scenario(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Scenario:
    """Load and validate a scenario file (the bundled default when `path` is None).

    `overrides` is a nested dict merged over the file's content before validation.
    """
    p = Path(path) if path is not None else DEFAULT_SCENARIO
    if path is None and not p.is_file():
        raise UserError("no scenario given, and no bundled default here: run in a qlmctl checkout (its "
                        "scenarios/default.yaml), or pass --scenario FILE")
    data = _read_yaml(p)
    if not isinstance(data, dict):
        raise UserError("expected a mapping at the top level", p)
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        spec = ScenarioSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        m = re.match(r"([A-Za-z_][\w-]*(?:\.[\w-]+)+): (.*)", msg, re.S)
        if not loc and m:  # a check across fields names the field it found at fault
            loc = tuple(int(x) if x.isdigit() else x for x in m.group(1).split("."))
            msg = m.group(2)
        raise UserError(msg, p, _line_of(p, loc), _format_loc(loc) or None) from None
    return Scenario(spec, p)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
