"""The request waiting time (RWT) estimator.

A request at some position of an instance's virtual queue starts when enough of the requests ahead of
it have finished to free a batch slot. Their output lengths are unknown, so the estimator treats each
as a draw from the model's output-length distribution (learned online from completed requests, with a
prior from the profile) and, by the central limit theorem, takes the sum of N such draws as normal with
mean N*mu and variance N*sigma^2; a percentile of that sum divided by the instance's token throughput at
its batch size gives the time, to which prefill work and model swaps ahead are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from simulator.profile import EngineProfile


@dataclass(slots=True)
class OutputStats:
    """Running mean and variance of output lengths (Welford), starting from a prior worth `prior_n` samples."""

    mean: float
    m2: float
    n: float

    @classmethod
    def with_prior(cls, mean: float, std: float, prior_n: float = 20.0) -> "OutputStats":
        return cls(mean=mean, m2=std * std * prior_n, n=prior_n)

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n > 0 else 0.0


@dataclass(slots=True, init=False)
class ServiceRate:
    """How fast one instance serves one model, from its profile and the output statistics."""

    concurrency: int
    """Requests served at once (batch slots, limited by KV memory)."""
    request_time_s: float
    """Mean time a request occupies a batch slot (its decode steps), at full concurrency."""
    token_time_s: float
    """Seconds per output token of one sequence at that concurrency (a decode step)."""
    prefill_s_per_token: float
    spread: float
    """The percentile's share of the output-length sum, per request: z * std / mean of the output length."""

    # Written out: the dataclass's generated one would be interpreted code in the compiled build.
    def __init__(self, concurrency: int, request_time_s: float, token_time_s: float, prefill_s_per_token: float,
                 spread: float) -> None:
        self.concurrency = concurrency
        self.request_time_s = request_time_s
        self.token_time_s = token_time_s
        self.prefill_s_per_token = prefill_s_per_token
        self.spread = spread

    @property
    def requests_per_s(self) -> float:
        return self.concurrency / self.request_time_s if self.request_time_s > 0 else math.inf

    def completions_time(self, n: float) -> float:
        """Time for `n` request completions, at the estimator's percentile: `RWTEstimator.completions_time`
        with the output statistics as of this rate, per request (the planners call it in their inner loops)."""
        if n <= 0:
            return 0.0
        return max(0.0, n + self.spread * math.sqrt(n)) * self.request_time_s / self.concurrency


class RWTEstimator:
    """Estimates waiting and drain times on an instance. One per policy; no global state."""

    def __init__(self, profiles: dict[str, EngineProfile], percentile: float = 0.9) -> None:
        self.percentile = percentile
        self.z = NormalDist().inv_cdf(percentile)
        self.stats: dict[str, OutputStats] = {
            m: OutputStats.with_prior(p.mean_output_tokens, p.std_output_tokens) for m, p in profiles.items()
        }
        self._prompt_mean: dict[str, OutputStats] = {m: OutputStats.with_prior(512.0, 512.0, 1.0) for m in profiles}
        self.class_stats: dict[str, dict[str, OutputStats]] = {}
        """Output lengths by model, then SLO class: classes of one model can differ by 10x (code vs chat). (Nested,
        not keyed by (model, class): asked per queued request, and no tuple is made and hashed.)"""
        self._observed = 0
        """Requests learnt from: `rate` is a function of the profile, the model and this state alone."""
        self._rates: dict[tuple[int, str], tuple[int, EngineProfile, ServiceRate]] = {}
        """`rate`'s answers per (profile, by id: the entry keeps it alive; model), as of `_observed`."""

    def observe(self, model: str, prompt_tokens: int, output_tokens: int, slo_class: str | None = None) -> None:
        """Learn from a finished request (per class too, when `slo_class` is given)."""
        self._observed += 1
        st = self.stats.get(model)
        if st is None:
            st = self.stats[model] = OutputStats.with_prior(256.0, 256.0)
            self._prompt_mean[model] = OutputStats.with_prior(512.0, 512.0, 1.0)
        st.add(output_tokens)
        self._prompt_mean[model].add(prompt_tokens)
        if slo_class is not None:
            of_model = self.class_stats.get(model)
            if of_model is None:
                of_model = self.class_stats[model] = {}
            cs = of_model.get(slo_class)
            if cs is None:  # starts from the model's prior, worth a few samples
                cs = of_model[slo_class] = OutputStats.with_prior(st.mean, st.std, 5.0)
            cs.add(output_tokens)

    def class_output_mean(self, model: str, slo_class: str) -> float:
        """Mean output length of `model`'s requests of `slo_class` (the model's while none has finished)."""
        of_model = self.class_stats.get(model)
        cs = of_model.get(slo_class) if of_model is not None else None
        return cs.mean if cs is not None else self.output_mean(model)

    def prompt_mean(self, model: str) -> float:
        st = self._prompt_mean.get(model)
        return st.mean if st is not None else 512.0

    def output_mean(self, model: str) -> float:
        st = self.stats.get(model)
        return st.mean if st else 256.0

    def rate(self, profile: EngineProfile, model: str) -> ServiceRate:
        """How fast an instance with `profile` serves `model`, from the output statistics now (the same
        object again while nothing new was observed: planners ask once per instance, and instances share
        profiles)."""
        key = (id(profile), model)
        hit = self._rates.get(key)
        if hit is not None and hit[0] == self._observed:
            return hit[2]
        rate = self._rate(profile, model)
        self._rates[key] = (self._observed, profile, rate)
        return rate

    def _rate(self, profile: EngineProfile, model: str) -> ServiceRate:
        st = self.stats.get(model) or OutputStats.with_prior(256.0, 256.0)
        mu = max(1.0, st.mean)
        prompt = self._prompt_mean[model].mean if model in self._prompt_mean else 512.0
        kv_conc = int(profile.kv_blocks * profile.block_size / max(1.0, prompt + mu / 2))
        conc = max(1, min(profile.max_num_seqs, kv_conc))
        step = profile.step_time(0, conc, int(conc * (prompt + mu / 2)))
        # Prefill of each request is spread over the decode steps it shares with the batch.
        req_time = mu * step + conc * profile.prefill_work_s(prompt)
        return ServiceRate(conc, req_time, step, profile.per_prefill_token_s, self.z * st.std / mu)

    def completions_time(self, n: float, rate: ServiceRate, model: str, pct: bool = True) -> float:
        """Time for `n` request completions on an instance serving at `rate` (CLT percentile)."""
        if n <= 0:
            return 0.0
        st = self.stats.get(model) or OutputStats.with_prior(256.0, 256.0)
        mu = max(1.0, st.mean)
        tokens = n * mu
        if pct:
            tokens += self.z * st.std * math.sqrt(n)
        # n completions at `concurrency` parallel streams: tokens spread over the slots.
        return max(0.0, tokens / mu) * rate.request_time_s / rate.concurrency

    def wait_time(self, ahead: float, running: int, rate: ServiceRate, model: str, pct: bool = True) -> float:
        """Waiting time of a request with `ahead` requests queued before it and `running` in the batch.

        It starts once `running + ahead - concurrency + 1` of those have finished.
        """
        need = running + ahead - rate.concurrency + 1
        return self.completions_time(need, rate, model, pct)
