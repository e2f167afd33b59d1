"""The highest arrival rate a configuration sustains at a target SLO attainment, by bisection.

The search assumes attainment falls as the rate rises (as capacity planners do). A rate *holds* the target
when its attainment reaches it in a steady state: a probe that did not complete (nearly) its offered rate
over its measured window is building a backlog, and misses whatever its attainment (a short burst can
look fine only because the deadlines absorb it). It probes both
bounds first (together); if the lower bound already misses the target, or the upper bound still
holds it, the answer is outside the bracket and says so. Otherwise each round probes
`probes_per_round` evenly spaced rates inside the bracket `[holds, misses)` and keeps the part
between the highest probe that holds and the next one up; it stops when the bracket is within
the tolerance or after `max_iterations` rounds. The probe rates depend only on earlier results,
so a search is deterministic and a rerun meets its own cached probes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class CapacityStatus(str, enum.Enum):
    SEARCHING = "searching"
    CONVERGED = "converged"
    """The bracket is within the tolerance."""
    MAX_ITERATIONS = "max_iterations"
    """Stopped after max_iterations rounds; the bracket is wider than the tolerance."""
    ABOVE_MAX = "above_max"
    """Even rate_max_rps holds the target: the capacity is at least that."""
    BELOW_MIN = "below_min"
    """Even rate_min_rps misses the target: the capacity is below it."""
    FAILED = "failed"
    """A probe failed (after its retries); no answer."""


def round_rate(x: float) -> float:
    """Probe rates to 6 significant digits: readable, and stable as cache keys."""
    return float(f"{x:.6g}")


@dataclass
class Bisection:
    """The search state for one configuration; feed it results with `record`.

    Usage: `next_rates()` gives the rates to probe now (none while some are outstanding or when
    done); give each result to `record(rate, attainment)` (attainment None: the probe failed).
    """

    target: float
    rate_min: float
    rate_max: float
    tolerance: float
    max_iterations: int
    probes_per_round: int = 1

    status: CapacityStatus = CapacityStatus.SEARCHING
    holds: float | None = None
    """Highest rate known to hold the target (the answer)."""
    misses: float | None = None
    """Lowest rate known to miss it (the bracket's top)."""
    rounds: int = 0
    probes: dict[float, float | None] = field(default_factory=dict)
    """Rate -> attainment (None: failed) of every probe so far."""
    unsteady: set[float] = field(default_factory=set)
    """Probed rates that did not reach a steady state: they miss the target whatever their attainment."""
    error: str | None = None
    _outstanding: set[float] = field(default_factory=set)
    _issued: bool = False

    @property
    def done(self) -> bool:
        return self.status is not CapacityStatus.SEARCHING

    @property
    def max_rate(self) -> float | None:
        """The highest rate found to hold the target; None below the bracket or on failure."""
        if self.status in (CapacityStatus.BELOW_MIN, CapacityStatus.FAILED, CapacityStatus.SEARCHING):
            return None
        return self.holds

    def next_rates(self) -> list[float]:
        if self.done or self._outstanding:
            return []
        if not self._issued:
            self._issued = True
            rates = [round_rate(self.rate_min), round_rate(self.rate_max)]
        else:
            assert self.holds is not None and self.misses is not None
            k = self.probes_per_round
            span = self.misses - self.holds
            rates = sorted({round_rate(self.holds + span * i / (k + 1)) for i in range(1, k + 1)})
            # Rounding may collapse a tiny bracket onto its ends; then it cannot shrink further.
            rates = [r for r in rates if self.holds < r < self.misses]
            if not rates:
                self.status = CapacityStatus.CONVERGED
                return []
            self.rounds += 1
        self._outstanding = set(rates)
        return rates

    def record(self, rate: float, attainment: float | None, error: str | None = None, steady: bool = True) -> None:
        """A probe's result: its attainment (None: it failed) and whether it was steady (completed its
        offered rate); an unsteady probe misses the target."""
        if rate not in self._outstanding:
            raise ValueError(f"rate {rate} was not asked for")
        self._outstanding.discard(rate)
        self.probes[rate] = attainment
        if not steady:
            self.unsteady.add(rate)
        if attainment is None and not self.done:
            self.status = CapacityStatus.FAILED
            self.error = error or "probe failed"
        if self._outstanding or self.done:
            return
        self._settle()

    def held(self, rate: float) -> bool:
        """Whether the probe at `rate` held the target: attainment reached it, in a steady state."""
        a = self.probes.get(rate)
        return a is not None and a >= self.target and rate not in self.unsteady

    def _settle(self) -> None:
        """Narrow the bracket once every probe of the round is in."""
        if self.holds is None and self.misses is None:  # the bounds round
            lo, hi = round_rate(self.rate_min), round_rate(self.rate_max)
            if not self.held(lo):
                self.misses, self.status = lo, CapacityStatus.BELOW_MIN
                return
            if self.held(hi):
                self.holds, self.status = hi, CapacityStatus.ABOVE_MAX
                return
            self.holds, self.misses = lo, hi
        else:
            assert self.holds is not None and self.misses is not None
            inside = sorted(r for r in self.probes if self.holds < r < self.misses)
            for r in inside:
                if self.held(r):
                    self.holds = r
                else:
                    self.misses = r
                    break
        if self.misses - self.holds <= self.tolerance:
            self.status = CapacityStatus.CONVERGED
        elif self.rounds >= self.max_iterations:
            self.status = CapacityStatus.MAX_ITERATIONS
