"""From a sweep file to the simulations to run: points, bisection configurations, bundles.

A *configuration* is everything about a simulation but its arrival rate: scenario, policy,
instance count, seed, request cap. A *point* is a configuration at one rate. A point's key is a
stable hash of what it runs (the scenario bundle's digest, the policy and the scenario overrides),
so results cached under it stay valid across runs, machines and checkouts.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlmctl.errors import UserError
from qlmctl.scenario import REPO_ROOT, Scenario, _deep_merge, load_scenario
from qlmctl.sweep.bundle import Bundle, make_bundle
from qlmctl.sweep.spec import ListedPoint, SweepSpec, line_of

if TYPE_CHECKING:
    from qlmctl.sweep.point import LocalBundle, PointOutcome

TRACE_RATE_FIELD = ("workload", "target_rate_rps")
SYNTHETIC_RATE_FIELD = ("workload", "synthetic", "rate_rps")


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        out = {key: out}
    return out


@dataclass(frozen=True)
class Configuration:
    """A simulation but for its rate; the unit that bisection searches over."""

    scenario: str
    """The scenario file's stem (the path as the sweep writes it, if two stems clash)."""
    policy: str
    instances: int
    """Total instances simulated."""
    gpus: str
    """The fleet, e.g. "4xH200" or "2xH200+2xA100"."""
    seed: int
    max_requests: int | None
    duration_s: float | None
    """Seconds of arrivals (None: the scenario's requests once)."""
    measure: tuple[float, float, bool]
    """(warm-up fraction, least completed/offered throughput ratio of a steady point, stop unsteady points)."""
    bundle: str
    """Digest of the scenario bundle."""
    base_overrides: str
    """Scenario overrides but the rate, as canonical JSON."""
    rate_field: tuple[str, ...]
    """Where the rate goes in the scenario (trace or synthetic workload)."""

    def at(self, rate_rps: float) -> "Point":
        return Point(self, float(rate_rps))

    def labels(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "policy": self.policy,
            "instances": self.instances,
            "gpus": self.gpus,
            "seed": self.seed,
            "max_requests": self.max_requests,
            "duration_s": self.duration_s,
        }

    def describe(self) -> str:
        return (f"scenario={self.scenario} policy={self.policy} instances={self.instances} "
                f"seed={self.seed}" + (f" max_requests={self.max_requests}" if self.max_requests else "")
                + (f" duration={self.duration_s:g}s" if self.duration_s else ""))


@dataclass(frozen=True)
class Point:
    """One simulation: a configuration at an arrival rate (requests/s)."""

    config: Configuration
    rate_rps: float

    def overrides(self) -> dict[str, Any]:
        """Nested scenario fields to set for this point (merged before validation)."""
        return _deep_merge(json.loads(self.config.base_overrides), _nested(self.config.rate_field, self.rate_rps))

    @functools.cached_property
    def key(self) -> str:
        """Stable id of what this point runs (hex, 16 chars)."""
        text = canonical_json({
            "bundle": self.config.bundle,
            "policy": self.config.policy,
            "overrides": self.overrides(),
            "measure": list(self.config.measure),
        })
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def labels(self) -> dict[str, Any]:
        return {**self.config.labels(), "rate_rps": self.rate_rps}

    def describe(self) -> str:
        return f"{self.config.describe()} rate={self.rate_rps:g} req/s"

    # The executor's task protocol (`qlmctl.sweep.executors.Task`); the work itself is in `point`.

    @property
    def bundle(self) -> str:
        return self.config.bundle

    def run(self, source: Bundle | LocalBundle) -> PointOutcome:
        from qlmctl.sweep.point import run_point

        return run_point(self, source)

    def lost(self, e: BaseException, what: str) -> PointOutcome:
        from qlmctl.sweep.point import lost_outcome

        return lost_outcome(self, e, what)


@dataclass
class ScenarioEntry:
    label: str
    scenario: Scenario
    bundle: Bundle


@dataclass
class SweepPlan:
    """What a sweep runs: grid points, bisection configurations and the bundles they need."""

    spec: SweepSpec
    path: Path
    scenarios: dict[str, ScenarioEntry] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    """Points at the listed rates (grid or list), in sweep order, without duplicates."""
    configurations: list[Configuration] = field(default_factory=list)
    """Configurations to bisect (empty without `bisection`)."""

    @property
    def bundles(self) -> dict[str, Bundle]:
        return {e.bundle.digest: e.bundle for e in self.scenarios.values()}

    def max_probes(self) -> int:
        """Upper bound on the bisection probes (2 bounds + k per round)."""
        b = self.spec.bisection
        if b is None:
            return 0
        return len(self.configurations) * (2 + b.max_iterations * b.probes_per_round)


def _resolve(ref: str, base: Path) -> Path:
    """A scenario named in the sweep: relative to the sweep file, else the cwd, else the repo."""
    cand = Path(ref)
    if cand.is_absolute():
        return cand
    for root in (base, Path.cwd(), REPO_ROOT):
        if (root / cand).exists():
            return root / cand
    return base / cand


def _instance_lines(scenario: Scenario, count: int | None) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """The cluster lines for `count` instances (None: the scenario's own) and each one's GPU.

    A one-line cluster gets `count` replicas; a mixed one is cycled through, instance by
    instance, until `count` (so 2 x {A, B} at count 3 gives A, B, A).
    """
    expanded = [spec for _, spec in scenario.instance_specs()]
    if count is None:
        return None, [s.gpu for s in expanded]
    lines = scenario.spec.cluster.instances
    if len(lines) == 1:
        line = lines[0].model_dump(mode="json")
        line["count"] = count
        return [line], [lines[0].gpu] * count
    chosen = [expanded[i % len(expanded)] for i in range(count)]
    out = [{**s.model_dump(mode="json"), "count": 1, "name": None} for s in chosen]
    return out, [s.gpu for s in chosen]


def _gpus_label(gpus: list[str]) -> str:
    return "+".join(f"{n}x{g}" for g, n in Counter(gpus).items())


def _scenario_labels(refs: list[str]) -> dict[str, str]:
    """How results name each scenario: its file's stem, or the path as written if stems clash."""
    stems = Counter(Path(r).stem for r in dict.fromkeys(refs))
    return {r: Path(r).stem if stems[Path(r).stem] == 1 else r for r in refs}


class _Planner:
    def __init__(self, spec: SweepSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self.plan = SweepPlan(spec, path)
        refs = list(spec.scenarios) + [p.scenario for p in spec.points or [] if p.scenario]
        self.labels = _scenario_labels(refs)

    def entry(self, ref: str) -> ScenarioEntry:
        label = self.labels[ref]
        if label not in self.plan.scenarios:
            sc = load_scenario(_resolve(ref, self.path.parent), self.spec.overrides or None)
            self.plan.scenarios[label] = ScenarioEntry(label, sc, make_bundle(sc))
        return self.plan.scenarios[label]

    def configuration(self, ref: str, policy: str, instances: int | None, seed: int | None,
                      max_requests: int | None) -> Configuration:
        entry = self.entry(ref)
        sc = entry.scenario
        over: dict[str, Any] = {"seed": sc.spec.seed if seed is None else seed}
        lines, gpus = _instance_lines(sc, instances)
        if lines is not None:
            over["cluster"] = {"instances": lines}
        if max_requests is not None:
            over["workload"] = {"max_requests": max_requests}
        if self.spec.duration_s is not None:
            over = _deep_merge(over, {"workload": {"duration_s": self.spec.duration_s}})
        wl = sc.spec.workload
        if wl.trace is not None:
            over = _deep_merge(over, {"workload": {"time_scale": 1.0}})
            rate_field = TRACE_RATE_FIELD
        else:
            rate_field = SYNTHETIC_RATE_FIELD
        return Configuration(
            scenario=entry.label,
            policy=policy,
            instances=len(gpus),
            gpus=_gpus_label(gpus),
            seed=over["seed"],
            max_requests=max_requests if max_requests is not None else wl.max_requests,
            duration_s=self.spec.duration_s if self.spec.duration_s is not None else wl.duration_s,
            measure=(self.spec.warmup_fraction, self.spec.min_throughput_ratio, self.spec.stop_unsteady),
            bundle=entry.bundle.digest,
            base_overrides=canonical_json(over),
            rate_field=rate_field,
        )


def _check_policies(spec: SweepSpec, path: Path) -> None:
    from qlmctl.policies import policy_class

    names = [(("policies", i), p) for i, p in enumerate(spec.policies)]
    names += [(("points", i, "policy"), p.policy) for i, p in enumerate(spec.points or []) if p.policy]
    for loc, name in names:
        try:
            policy_class(name)
        except UserError as e:
            raise UserError(e.message, path, line_of(path, *loc), ".".join(map(str, loc))) from None


def _pick(spec: SweepSpec, path: Path, i: int, point: ListedPoint, name: str, top: str) -> Any:
    value = getattr(point, name)
    if value is not None:
        return value
    if name == "max_requests":
        return spec.max_requests
    values = getattr(spec, top)
    if len(values) == 1:
        return values[0]
    what = "none" if not values else f"{len(values)} values"
    raise UserError(
        f"not given, and the sweep's {top} has {what} (give one there or here)",
        path, line_of(path, "points", i), f"points.{i}.{name}",
    )


def build_plan(spec: SweepSpec, path: str | Path) -> SweepPlan:
    """Expand a sweep into points and configurations, loading and bundling each scenario once.

    Raises:
        UserError: an unknown policy, a bad scenario (naming the scenario file), a listed point
            missing a field.
    """
    path = Path(path)
    _check_policies(spec, path)
    planner = _Planner(spec, path)
    plan = planner.plan
    seen_points: set[str] = set()
    seen_configs: set[Configuration] = set()

    def add_point(p: Point) -> None:
        if p.key not in seen_points:
            seen_points.add(p.key)
            plan.points.append(p)

    def add_config(c: Configuration) -> None:
        if spec.bisection is not None and c not in seen_configs:
            seen_configs.add(c)
            plan.configurations.append(c)

    if spec.mode == "grid":
        combos = itertools.product(spec.scenarios, spec.policies, spec.instances, spec.seeds)
        for label, policy, n, seed in combos:
            config = planner.configuration(label, policy, n, seed, spec.max_requests)
            add_config(config)
            for rate in spec.rates_rps:
                add_point(config.at(rate))
        return plan

    for i, lp in enumerate(spec.points or []):
        label = _pick(spec, path, i, lp, "scenario", "scenarios")
        policy = _pick(spec, path, i, lp, "policy", "policies")
        n = _pick(spec, path, i, lp, "instances", "instances")
        seed = _pick(spec, path, i, lp, "seed", "seeds")
        cap = _pick(spec, path, i, lp, "max_requests", "max_requests")
        config = planner.configuration(label, policy, n, seed, cap)
        add_config(config)
        if lp.rate_rps is not None or spec.bisection is None or len(spec.rates_rps) == 1:
            add_point(config.at(_pick(spec, path, i, lp, "rate_rps", "rates_rps")))
    return plan
