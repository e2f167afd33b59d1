"""The sweep file: which simulations to run, validated with pydantic on load.

A sweep names scenario files, policies, instance counts, request rates and seeds. In `grid` mode
every combination is one simulation (a *point*); in `list` mode the points are listed one by one.
With `bisection`, every configuration (scenario, policy, instances, seed) is also searched for the
highest rate that still holds `target_attainment`.

Every error names the sweep file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlmctl.errors import UserError
from qlmctl.scenario import _format_loc, _line_of, _read_yaml


PositiveRate = Annotated[float, Field(gt=0)]
PositiveCount = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BisectionSpec(_Strict):
    """Search, per configuration, the highest rate whose SLO attainment is >= the target."""

    rate_min_rps: float = Field(gt=0, description="lowest rate probed, requests/s")
    rate_max_rps: float = Field(gt=0, description="highest rate probed, requests/s")
    tolerance_rps: float = Field(default=1.0, gt=0, description="stop when the bracket is this narrow, requests/s")
    max_iterations: int = Field(default=12, ge=1, description="bisection rounds after the two bound probes")
    probes_per_round: int = Field(
        default=1, ge=1, le=64,
        description="rates probed in parallel per round (k-section); 1 is plain bisection",
    )

    @model_validator(mode="after")
    def _bracket(self) -> "BisectionSpec":
        if self.rate_max_rps <= self.rate_min_rps:
            raise ValueError("rate_max_rps must be greater than rate_min_rps")
        return self


class ListedPoint(_Strict):
    """One point of a `list` sweep; an omitted field takes the sweep's single value for it."""

    scenario: str | None = None
    policy: str | None = None
    instances: int | None = Field(default=None, gt=0)
    rate_rps: float | None = Field(default=None, gt=0, description="requests/s")
    seed: int | None = None
    max_requests: int | None = Field(default=None, gt=0)


class SweepSpec(_Strict):
    name: str | None = Field(default=None, description="default: the sweep file's stem")
    description: str = ""
    mode: Literal["grid", "list"] = "grid"
    scenarios: list[str] = Field(min_length=1, description="scenario files, relative to the sweep file")
    policies: list[str] = Field(min_length=1)
    instances: list[PositiveCount | None] = Field(
        default_factory=lambda: [None],
        description="total instance counts; null: the scenario's own cluster",
    )
    rates_rps: list[PositiveRate] = Field(default_factory=list, description="arrival rates, requests/s")
    seeds: list[int | None] = Field(default_factory=lambda: [None], description="null: the scenario's seed")
    max_requests: int | None = Field(default=None, gt=0, description="requests replayed per point")
    duration_s: float | None = Field(
        default=600.0, gt=0,
        description="seconds of arrivals per point at its rate (a trace is repeated to fill them); null: the "
                    "scenario's requests once (max_requests of them), however short they last at a high rate")
    warmup_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="the first part of the arrival span left out of a point's metrics")
    min_throughput_ratio: float = Field(
        default=0.95, gt=0, le=1,
        description="a point is steady when it completes at least this fraction of its offered rate over the "
                    "measured window; an unsteady point cannot hold the target")
    stop_unsteady: bool = Field(
        default=True, description="stop simulating a point once it cannot be steady (its metrics then count the "
                                  "requests it did not serve as misses)")
    points: list[ListedPoint] | None = None
    target_attainment: float = Field(default=0.9, gt=0, le=1, description="fraction of requests meeting SLO")
    bisection: BisectionSpec | None = None
    retries: int = Field(default=1, ge=0, le=20, description="extra attempts for a point that fails")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="nested scenario fields set in every scenario"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        if self.mode == "grid":
            if self.points is not None:
                raise ValueError("points are for mode: list; a grid takes the product of the lists")
            if not self.rates_rps and self.bisection is None:
                raise ValueError("give rates_rps, bisection or both")
        elif not self.points:
            raise ValueError("mode: list needs a non-empty points list")
        return self


def load_sweep(path: str | Path) -> SweepSpec:
    """Load and validate a sweep file.

    Raises:
        UserError: unreadable file, invalid YAML or a bad field (naming its line).
    """
    p = Path(path)
    data = _read_yaml(p)
    if not isinstance(data, dict):
        raise UserError("expected a mapping at the top level", p)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(msg, p, _line_of(p, err["loc"]), _format_loc(err["loc"]) or None) from None
    if spec.name is None:
        spec.name = p.stem
    return spec


def line_of(path: Path, *loc: str | int) -> int | None:
    """The line of a key path in the sweep file, for errors found after validation."""
    return _line_of(path, tuple(loc))
