"""The evaluation suite: every scenario against every policy at several offered loads, in parallel.

A *point* is one (scenario, offered rate, policy) simulation. Points run on a sweep executor
(`qlmctl.sweep.executors`: local worker processes, or Ray), one simulation per worker at a time; each
scenario travels to the workers as a bundle, the workers send back each run's summary and tables, and
this process writes a results folder per point

    <runs_dir>/<scenario key>/<rate label>/<policy>/   (summary.json, requests, timeline, scenario)

whose summary.json carries, besides `metrics.summarize`'s keys, `eval_scenario`, `target_rate_rps`
(the offered rate asked for, req/s; None when a trace is replayed at its own pace) and
`offered_rate_rps` (the rate the built workload really has). `qlmctl plot` reads these to draw
attainment against the offered rate. The results become markdown tables (`markdown_report`) and
figures (`write_figures`).

How a rate is applied: a synthetic (Poisson) scenario gets `workload.synthetic.rate_rps = rate` and,
when the suite gives a duration, `num_requests = rate x duration`, so every load covers the same span
of time; a trace replay gets `workload.target_rate_rps = rate` (arrivals compressed or stretched,
their pattern kept), or its own timing for `None`.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlmctl.errors import UserError
from qlmctl.scenario import REPO_ROOT, load_scenario

if TYPE_CHECKING:
    import pandas as pd

    from qlmctl.sweep.bundle import Bundle
    from qlmctl.sweep.executors import Executor
    from qlmctl.sweep.point import LocalBundle

BEGIN_MARK = "<!-- qlmctl evaluate: generated tables begin (do not edit by hand) -->"
END_MARK = "<!-- qlmctl evaluate: generated tables end -->"

BASELINES = ("fcfs", "priority", "edf", "shepherd")
"""The schedulers users already have, that QLM is held to: vLLM's FCFS and priority scheduling, EDF, SHEPHERD."""
OURS = ("qlm", "qlm-strict", "qlm-lp")
TIMELINE_POLICIES = ("fcfs", "shepherd", "qlm")
"""Policies whose instance timelines the evaluation draws (at each scenario's showcase rate)."""


@dataclass(frozen=True, slots=True)
class EvalScenario:
    """One scenario of the suite and the loads it is run at."""

    key: str
    file: str
    """Scenario YAML, relative to the repository root (or absolute)."""
    rates_rps: tuple[float | None, ...]
    """Offered rates, req/s; None: a trace at its own pace."""
    duration_s: float | None = None
    """Synthetic scenarios: arrivals span this long at every rate (num_requests = rate x duration)."""
    showcase_rate: float | None = None
    """The rate whose runs get the detailed figures (default: the highest)."""
    quick_rates_rps: tuple[float | None, ...] = ()
    quick_duration_s: float | None = None
    quick_max_requests: int | None = None
    """--quick: cap a trace replay at this many requests."""

    @property
    def path(self) -> Path:
        p = Path(self.file)
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def showcase(self) -> float | None:
        if self.showcase_rate is not None or not self.rates_rps:
            return self.showcase_rate
        known = [r for r in self.rates_rps if r is not None]
        return max(known) if known else None

    def quick(self) -> "EvalScenario":
        """The small version run by --quick (and by CI): fewer rates, shorter spans."""
        rates = self.quick_rates_rps or (self.rates_rps[0], self.rates_rps[-1])
        rates = tuple(dict.fromkeys(rates))
        return replace(
            self,
            rates_rps=rates,
            duration_s=self.quick_duration_s or (self.duration_s / 10 if self.duration_s else None),
            showcase_rate=self.showcase_rate if self.showcase_rate in rates else None,
        )


SUITE: tuple[EvalScenario, ...] = (
    # Two H200s saturate near 48 req/s with Azure-conversation lengths; 110 req/s is 2x overload,
    # where even the interactive + 60 s classes alone (60 % of requests) exceed capacity.
    EvalScenario("w_a", "scenarios/w_a.yaml", (30, 55, 80, 110, 140), duration_s=300, quick_duration_s=40),
    # Four models on two instances: capacity depends on the swaps; 45 req/s overloads every policy.
    EvalScenario("w_b", "scenarios/w_b.yaml", (10, 20, 30, 45, 60), duration_s=900, quick_duration_s=120),
    # Long prompts: KV-bound, about 5 req/s of capacity.
    EvalScenario("w_c", "scenarios/w_c.yaml", (3, 5, 7, 10), duration_s=600, quick_duration_s=80),
    # Real traces, arrivals compressed to each rate (their burstiness kept).
    EvalScenario("azure_conv", "scenarios/azure_conv.yaml", (60, 110, 160), quick_max_requests=2500),
    EvalScenario("burstgpt", "scenarios/burstgpt.yaml", (20, 40, 60), quick_max_requests=2500),
    EvalScenario("mooncake", "scenarios/mooncake.yaml", (None, 6, 9), quick_max_requests=1500),
    # One H200 under code-completion lengths: the prefill budget, not slots or KV, runs out (about 20 req/s).
    EvalScenario("prefill_bound", "scenarios/prefill_bound.yaml", (10, 19, 22, 26, 35), duration_s=180,
                 quick_duration_s=40),
    # Classes that differ in cost as much as urgency: code (1 s), chat (10 s), batch (600 s) on two H200s.
    EvalScenario("code_chat_batch", "scenarios/code_chat_batch.yaml", (30, 45, 60, 80, 100), duration_s=200,
                 quick_duration_s=30),
    # One H200, decode-heavy conversation traffic filling its KV cache (the trace at 6x to 12x its pace).
    EvalScenario("conversation_1gpu", "scenarios/conversation_1gpu.yaml", (20, 33, 45), quick_max_requests=2000),
    # A TPOT class (30 ms) beside batch ones on two H200s.
    EvalScenario("tpot", "scenarios/tpot.yaml", (20, 40, 55, 70), duration_s=200, quick_duration_s=40),
    # Heterogeneous instances: one H200 and two (derived) H100s.
    EvalScenario("hetero", "scenarios/hetero.yaml", (60, 120, 160, 200), duration_s=200, quick_duration_s=40),
)


@dataclass(frozen=True, slots=True)
class EvalPoint:
    """One simulation to run: a scenario at a rate under a policy."""

    scenario: str
    path: str
    policy: str
    rate: float | None
    overrides: dict[str, Any]
    out_dir: str
    """The rate's folder; the run goes to out_dir/policy."""
    cost: float = 1.0
    """Relative expected run time, to start the longest points first."""


@dataclass(slots=True)
class PointResult:
    point: EvalPoint
    summary: dict[str, Any] | None
    folder: str | None
    wall_s: float
    """Seconds the simulation took in its worker (loading, building requests, simulating)."""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EvalTask:
    """A point as an executor task (`qlmctl.sweep.executors.Task`): simulated on its scenario's bundle."""

    index: int
    """The point's place in the list given to `run_points`."""
    point: EvalPoint
    bundle: str
    """Digest of the bundle of the point's scenario file."""

    def run(self, source: Bundle | LocalBundle) -> PointRun:
        return simulate_point(self, source)

    def lost(self, e: BaseException, what: str) -> PointRun:
        return PointRun(self.index, None, None, None, 0.0, f"{type(e).__name__}: {what}: {e}")


@dataclass(slots=True)
class PointRun:
    """What a worker sends back for one point: the run's summary and tables, or why it failed."""

    index: int
    summary: dict[str, Any] | None
    requests: pd.DataFrame | None
    """`qlmctl.report.requests_frame` of the finished run."""
    timeline: pd.DataFrame | None
    wall_s: float
    error: str | None = None


@dataclass(slots=True)
class Evaluation:
    """Everything one evaluation produced."""

    scenarios: list[EvalScenario]
    policies: list[str]
    results: list[PointResult] = field(default_factory=list)
    wall_s: float = 0.0
    """Seconds the whole evaluation took (simulations and figures)."""
    sim_wall_s: float = 0.0
    """... of which simulating."""
    ran_on: str = ""
    """Where the points ran, for the report (`Executor.where`: "16 local worker(s)", "Ray (64 CPUs)")."""

    @property
    def failed(self) -> list[PointResult]:
        return [r for r in self.results if r.error is not None]


def rate_label(rate: float | None) -> str:
    return "native" if rate is None else f"rate-{rate:g}"


def resolve_scenarios(names: Sequence[str] | None, quick: bool = False) -> list[EvalScenario]:
    """The suite's scenarios named (all when None), or scenario YAML files run as they are.

    Raises:
        UserError: a name that is neither a suite key nor an existing file.
    """
    by_key = {s.key: s for s in SUITE}
    chosen: list[EvalScenario] = []
    for name in names or list(by_key):
        if name in by_key:
            sc = by_key[name]
        else:
            p = Path(name)
            if not p.is_file():
                raise UserError(
                    f"unknown scenario '{name}': not one of {', '.join(by_key)} and not a file", field="scenarios"
                )
            sc = EvalScenario(p.stem, str(p.resolve()), (None,))
        chosen.append(sc.quick() if quick else sc)
    return chosen


def _overrides(sc: EvalScenario, rate: float | None, synthetic: bool, quick: bool) -> dict[str, Any]:
    wl: dict[str, Any] = {}
    if synthetic:
        if rate is not None:
            syn: dict[str, Any] = {"rate_rps": rate}
            if sc.duration_s is not None:
                syn["num_requests"] = max(2, int(round(rate * sc.duration_s)))
            wl["synthetic"] = syn
    else:
        wl["target_rate_rps"] = rate
        wl["time_scale"] = 1.0
        if quick and sc.quick_max_requests is not None:
            wl["max_requests"] = sc.quick_max_requests
    return {"workload": wl} if wl else {}


def plan_points(
    scenarios: Sequence[EvalScenario],
    policies: Sequence[str],
    runs_dir: Path,
    rates: Sequence[float | None] | None = None,
    quick: bool = False,
) -> list[EvalPoint]:
    """Every (scenario, rate, policy) point, the most expensive first.

    `rates` replaces every scenario's own rates. Raises UserError for a scenario that fails to load.
    """
    points: list[EvalPoint] = []
    for sc in scenarios:
        spec = load_scenario(sc.path).spec  # validates the file before any work starts
        synthetic = spec.workload.synthetic is not None
        for rate in rates if rates is not None else sc.rates_rps:
            over = _overrides(sc, rate, synthetic, quick)
            if synthetic:
                syn = spec.workload.synthetic
                assert syn is not None
                n = over.get("workload", {}).get("synthetic", {}).get("num_requests", syn.num_requests)
            else:
                n = spec.workload.max_requests or 20000
                if quick and sc.quick_max_requests:
                    n = min(n, sc.quick_max_requests)
            for pol in policies:
                points.append(EvalPoint(
                    scenario=sc.key,
                    path=str(sc.path),
                    policy=pol,
                    rate=rate,
                    overrides=over,
                    out_dir=str(Path(runs_dir) / sc.key / rate_label(rate)),
                    cost=float(n) * (3.0 if pol == "qlm-lp" else 1.0),
                ))
    points.sort(key=lambda p: -p.cost)
    return points


def simulate_point(task: EvalTask, source: Bundle | LocalBundle) -> PointRun:
    """Simulate one point on its bundled scenario (in a worker); never raises."""
    from qlmctl.report import requests_frame
    from qlmctl.report import timeline_frame
    from qlmctl.runner import simulate
    from qlmctl.sweep.bundle import with_origins
    from qlmctl.sweep.point import error_in_origins, open_bundle
    from qlmctl.vllm_bench import run_header
    from qlmctl.workload import build_requests

    point = task.point
    t0 = time.perf_counter()
    folder: Path | None = None
    origins: dict[str, str] = {}
    try:
        scenario_file, origins = open_bundle(source)
        folder = scenario_file.parent
        sc = load_scenario(scenario_file, point.overrides)
        requests, report = build_requests(sc)
        run = simulate(sc, point.policy, requests, copy_requests=False)  # built for this run alone
        run.summary.update(run_header(sc, report, requests, backend="simulate", label=point.policy))
        run.summary["eval_scenario"] = point.scenario
        run.summary["target_rate_rps"] = point.rate
        run.summary["offered_rate_rps"] = report.mean_rate_rps
        return PointRun(task.index, run.summary, requests_frame(run.result.requests), timeline_frame(run.result.timeline),
                        time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - one failed point must not sink the whole evaluation
        # Errors name the user's files, not the bundle's copies in this worker.
        if isinstance(e, UserError):
            msg = (e if folder is None else error_in_origins(e, folder, origins)).one_line()
        else:
            msg = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            if folder is not None:
                msg = with_origins(msg, folder, origins)
        return PointRun(task.index, None, None, None, time.perf_counter() - t0, msg)


def run_points(
    points: Sequence[EvalPoint],
    executor: Executor,
    on_done: Callable[[PointResult], None] | None = None,
) -> list[PointResult]:
    """Run `points` on `executor` and write each one's results folder; results in the order of `points`.

    Each scenario file goes to the executor once, as a bundle with the files it names, so that workers
    need not see this machine's disk; the workers send back each run's summary and tables, written here
    with the scenario as the user's file gives it. A point that fails (its scenario, its run, its worker,
    or writing its folder) comes back with its error; nothing is retried.
    """
    from qlmctl.sweep.bundle import make_bundle
    from qlmctl.sweep.executors import run_all

    results: dict[int, PointResult] = {}

    def finish(i: int, result: PointResult) -> None:
        results[i] = result
        if on_done is not None:
            on_done(result)

    digests: dict[str, str | UserError] = {}
    tasks: list[EvalTask] = []
    for i, p in enumerate(points):
        if p.path not in digests:
            try:
                bundle = make_bundle(load_scenario(p.path))
            except UserError as e:
                digests[p.path] = e
            else:
                executor.add_bundle(bundle)
                digests[p.path] = bundle.digest
        digest = digests[p.path]
        if isinstance(digest, UserError):
            finish(i, PointResult(p, None, None, 0.0, digest.one_line()))
        else:
            tasks.append(EvalTask(i, p, digest))

    dumps: dict[tuple[str, str], dict[str, Any]] = {}
    run_all(executor, tasks, lambda run: finish(run.index, _save(points[run.index], run, dumps)))
    return [results[i] for i in range(len(points))]


def _save(point: EvalPoint, run: PointRun, dumps: dict[tuple[str, str], dict[str, Any]]) -> PointResult:
    """Write a finished run's results folder as `qlmctl.runner.save` would have in the worker."""
    from qlmctl.report import write_results

    if run.error is not None or run.summary is None:
        return PointResult(point, None, None, run.wall_s, run.error or "no result")
    from qlmctl.invocation import command_line

    run.summary["command"] = command_line()  # the driver's (a worker's argv is its own)
    try:
        # The scenario as loaded from the user's file (the worker's names the bundle's copies);
        # the policies of one scenario and rate share it.
        key = (point.path, json.dumps(point.overrides, sort_keys=True))
        if key not in dumps:
            dumps[key] = load_scenario(point.path, point.overrides).dump()
        folder = write_results(Path(point.out_dir), point.policy, run.requests, run.summary, dumps[key],
                               run.timeline)
    except Exception as e:  # noqa: BLE001 - reported with the point, like a failed simulation
        msg = e.one_line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        return PointResult(point, None, None, run.wall_s, f"writing the results: {msg}")
    return PointResult(point, run.summary, str(folder), run.wall_s)


# --- the markdown report ---------------------------------------------------------------------------


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}"


def _num(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{float(x):,.{digits}f}"


def _policy_cell(policy: str) -> str:
    from qlmctl.plots import policy_label

    return policy_label(policy)


def _rate_cell(rate: float | None, offered: float | None) -> str:
    if rate is None:
        return f"own pace ({offered:.2f})" if offered else "own pace"
    return f"{rate:g}"


def _ordered(results: Sequence[PointResult], policies: Sequence[str]) -> list[PointResult]:
    order = {p: i for i, p in enumerate(policies)}
    return sorted(results, key=lambda r: (-1.0 if r.point.rate is None else r.point.rate,
                                          order.get(r.point.policy, len(order))))


def scenario_table(results: Sequence[PointResult], policies: Sequence[str]) -> str:
    """One markdown table for one scenario: a row per (rate, policy); the best attainment per rate in bold."""
    ok = [r for r in results if r.summary is not None]
    classes: list[str] = []
    for r in ok:
        for c in r.summary.get("slo_attainment_by_class") or {}:  # type: ignore[union-attr]
            if c not in classes:
                classes.append(c)
    slo = _class_slos(ok)
    classes.sort(key=lambda c: (slo.get(c, math.inf), c))
    head = ["offered rate (req/s)", "policy", "SLO att. (%)", *[f"{c} (%)" for c in classes],
            "goodput (req/s)", "throughput (req/s)", "TTFT p99 (s)", "swaps", "evictions", "completed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    best: dict[float | None, float] = {}
    for r in ok:
        v = r.summary.get("slo_attainment")  # type: ignore[union-attr]
        if v is not None:
            best[r.point.rate] = max(best.get(r.point.rate, -1.0), float(v))
    for r in _ordered(results, policies):
        s = r.summary
        if s is None:
            first = (r.error or "").splitlines()[0] if r.error else "failed"
            lines.append(f"| {_rate_cell(r.point.rate, None)} | {_policy_cell(r.point.policy)} | "
                         f"failed: {first} |" + " |" * (len(head) - 3))
            continue
        att = s.get("slo_attainment")
        att_cell = _pct(att)
        if att is not None and abs(float(att) - best.get(r.point.rate, -1)) < 1e-12:
            att_cell = f"**{att_cell}**"
        by_class = s.get("slo_attainment_by_class") or {}
        p99 = s.get("p99_ttft_ms")
        row = [
            _rate_cell(r.point.rate, s.get("offered_rate_rps")),
            _policy_cell(r.point.policy),
            att_cell,
            *[_pct(by_class.get(c)) for c in classes],
            _num(s.get("request_goodput")),
            _num(s.get("request_throughput")),
            "–" if p99 is None else f"{p99 / 1000:,.1f}",
            f"{int(s.get('num_swaps') or 0):,}",
            f"{int(s.get('num_evictions') or 0):,}",
            f"{int(s.get('completed') or 0):,}/{int(s.get('num_requests') or 0):,}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _class_slos(results: Sequence[PointResult]) -> dict[str, float]:
    import yaml

    for r in results:
        if r.folder is None:
            continue
        try:
            data = yaml.safe_load((Path(r.folder) / "scenario.yaml").read_text())
            return {k: float(v["ttft_s"]) for k, v in data["slo_classes"].items()}
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            continue
    return {}


def gains_table(results: Sequence[PointResult], ours: Sequence[str] = OURS,
                baselines: Sequence[str] = BASELINES) -> str | None:
    """QLM's gain over each baseline per rate: attainment in percentage points (and relative), throughput ratio."""
    by = {(r.point.rate, r.point.policy): r.summary for r in results if r.summary is not None}
    mine = [p for p in ours if any(k[1] == p for k in by)]
    base = [b for b in baselines if any(k[1] == b for k in by)]
    if not mine or not base:
        return None
    rates = sorted({k[0] for k in by}, key=lambda x: -1.0 if x is None else x)
    head = ["offered rate (req/s)", "policy", *[f"vs {b}: SLO att." for b in base], *[f"vs {b}: throughput" for b in base]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for rate in rates:
        for p in mine:
            s = by.get((rate, p))
            if s is None:
                continue
            att_cells, thr_cells = [], []
            for b in base:
                o = by.get((rate, b))
                if o is None:
                    att_cells.append("–")
                    thr_cells.append("–")
                    continue
                att_cells.append(_gain_pp(s.get("slo_attainment"), o.get("slo_attainment")))
                thr_cells.append(_ratio(s.get("request_throughput"), o.get("request_throughput")))
            lines.append("| " + " | ".join([_rate_cell(rate, s.get("offered_rate_rps")), p, *att_cells, *thr_cells])
                         + " |")
    return "\n".join(lines)


def claims_table(results: Sequence[PointResult]) -> str | None:
    """qlm against the best baseline at each scenario and load, and qlm-strict's worst class against priority."""
    by = {(r.point.scenario, r.point.rate, r.point.policy): r.summary for r in results if r.summary is not None}
    points = sorted({(k[0], k[1]) for k in by}, key=lambda k: (k[0], -1.0 if k[1] is None else k[1]))
    lines = ["| scenario | offered rate (req/s) | best baseline | qlm | qlm - best | qlm-strict: worst class - priority |",
             "|---|---:|---|---:|---:|---:|"]
    rows = 0
    for sc, rate in points:
        base = [(by[(sc, rate, b)].get("slo_attainment") or 0.0, b) for b in BASELINES if (sc, rate, b) in by]
        mine = by.get((sc, rate, "qlm"))
        if not base or mine is None:
            continue
        best_att, best = max(base)
        att = mine.get("slo_attainment") or 0.0
        strict_cell = "–"
        strict, prio = by.get((sc, rate, "qlm-strict")), by.get((sc, rate, "priority"))
        if strict is not None and prio is not None:
            sc_cls, pr_cls = strict.get("slo_attainment_by_class") or {}, prio.get("slo_attainment_by_class") or {}
            diffs = [(100 * (sc_cls.get(c, 0.0) - v), c) for c, v in pr_cls.items()]
            if diffs:
                d, c = min(diffs)
                strict_cell = f"{d:+.1f} pp ({c})"
        lines.append(f"| {sc} | {_rate_cell(rate, mine.get('offered_rate_rps'))} | {best} {100 * best_att:.1f} % | "
                     f"{100 * att:.1f} % | {100 * (att - best_att):+.1f} pp | {strict_cell} |")
        rows += 1
    return "\n".join(lines) if rows else None


def _gain_pp(a: Any, b: Any) -> str:
    if a is None or b is None:
        return "–"
    a, b = float(a), float(b)
    rel = "" if b <= 0 else f" ({100 * (a - b) / b:+.0f} %)"
    return f"{100 * (a - b):+.1f} pp{rel}"


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or float(b) <= 0:
        return "–"
    return f"{100 * (float(a) / float(b) - 1):+.1f} %"


def markdown_report(ev: Evaluation, command: str, figures: dict[str, list[str]] | None = None,
                    figures_rel: str = "figures") -> str:
    """The generated part of docs/evaluation.md: setup, one table per scenario, gains, figures."""
    from qlmctl.plots import policy_label

    out: list[str] = [BEGIN_MARK, ""]
    where = f" on {ev.ran_on}" if ev.ran_on else ""
    timing = f"{ev.wall_s:,.0f} s{where}"
    if ev.sim_wall_s and ev.wall_s > ev.sim_wall_s + 0.5:
        timing += f": {ev.sim_wall_s:,.0f} s simulating, {ev.wall_s - ev.sim_wall_s:,.0f} s drawing the figures"
    out.append(f"Generated by `{command}` ({len(ev.results)} simulations, {timing}). Policies: "
               + ", ".join(f"`{p}`{policy_label(p).removeprefix(p)}" for p in ev.policies)
               + ".")
    if ev.failed:
        out.append("")
        out.append(f"**{len(ev.failed)} point(s) failed:**")
        for r in ev.failed:
            first = (r.error or "").splitlines()[0]
            out.append(f"- {r.point.scenario} at {_rate_cell(r.point.rate, None)} under `{r.point.policy}`: {first}")
    out.append("")
    out.append("Columns: SLO attainment over all requests and per SLO class (a request never finished is a "
               "miss); goodput = requests meeting their SLO per second, throughput = completed requests per "
               "second, both over the run (first arrival to last completion); TTFT p99 over completed "
               "requests; swaps = model loads; evictions = requests the scheduler preempted. The best "
               "attainment at each rate is in bold.")
    claims = claims_table(ev.results)
    if claims:
        out += ["", "### qlm against the best baseline", "",
                "Per scenario and load: the best of the schedulers users already have (" + ", ".join(BASELINES)
                + ") by overall attainment, qlm's attainment and the difference (target: at least -0.5 points); "
                "with strict class precedence (`qlm-strict`), the worst class difference against vLLM's "
                "priority scheduling (target: at least -0.5 points).", "", claims]
    for sc in ev.scenarios:
        res = [r for r in ev.results if r.point.scenario == sc.key]
        if not res:
            continue
        desc = _description(sc)
        out += ["", f"### {sc.key}", ""]
        if desc:
            out += [desc, ""]
        out.append(scenario_table(res, ev.policies))
        gains = gains_table(res)
        if gains:
            out += ["", f"QLM against each baseline on {sc.key} (attainment difference in percentage "
                        "points, relative change in brackets; throughput change):", "", gains]
        for stem in (figures or {}).get(sc.key, []):
            out += ["", f"![{stem}]({figures_rel}/{stem}.png)"]
    out += ["", END_MARK]
    return "\n".join(out) + "\n"


def _description(sc: EvalScenario) -> str:
    try:
        spec = load_scenario(sc.path).spec
    except UserError:
        return ""
    rates = ", ".join("own pace" if r is None else f"{r:g}" for r in sc.rates_rps)
    span = f"; arrivals span {sc.duration_s:g} s at every rate" if sc.duration_s else ""
    return f"{spec.description} (`{Path(sc.file).name}`). Offered rates (req/s): {rates}{span}."


def write_report(md_path: Path, generated: str, title: str = "# Evaluation") -> None:
    """Put `generated` between the markers of `md_path`, keeping the hand-written text around them."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    if md_path.exists():
        text = md_path.read_text(encoding="utf-8")
        a, b = text.find(BEGIN_MARK), text.find(END_MARK)
        if a >= 0 and b > a:
            text = text[:a] + generated.rstrip("\n") + text[b + len(END_MARK):]
        else:
            text = text.rstrip("\n") + "\n\n" + generated
    else:
        text = f"{title}\n\n{generated}"
    md_path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


# --- figures ----------------------------------------------------------------------------------------


def write_figures(
    ev: Evaluation,
    figures_dir: Path,
    formats: Sequence[str] = ("png", "svg"),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[str]]:
    """Figures per scenario: attainment against rate, and the detailed set at its showcase rate.

    Returns the figure stems per scenario key, in the order to show them.
    """
    from qlmctl.plots import FIGURES, draw_figures, group_runs, load_runs, plan_figures

    jobs = []
    stems: dict[str, list[str]] = {}
    for sc in ev.scenarios:
        done = [r for r in ev.results if r.point.scenario == sc.key and r.folder is not None]
        if not done:
            continue
        groups = group_runs(load_runs([Path(r.folder) for r in done]))  # type: ignore[arg-type]
        rate_jobs = plan_figures(groups, ["attainment_vs_rate"], prefix=True)
        for j in rate_jobs:
            j.stem = f"{sc.key}-attainment_vs_rate"
        show = rate_label(sc.showcase)
        pick = [g for g in groups if any(r.folder.parent.name == show for r in g.runs)][:1]
        detail = plan_figures(pick, [f for f in FIGURES if f != "attainment_vs_rate"],
                              timeline_policies=TIMELINE_POLICIES, prefix=False)
        for j in detail:  # named by scenario key and rate label: stable across reruns
            j.stem = f"{sc.key}-{show}-{j.stem}"
        stems[sc.key] = [j.stem for j in rate_jobs + detail]
        jobs += rate_jobs + detail
    draw_figures(jobs, figures_dir, formats, progress)
    return stems
