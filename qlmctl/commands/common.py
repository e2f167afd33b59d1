"""What the command modules share: the consoles, the error exit, and the workload options' overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from qlmctl.errors import UserError

console = Console()
if not console.is_terminal:
    # Piped or captured output: wide enough that result tables keep one line per row.
    console = Console(width=max(console.width, 110))
err_console = Console(stderr=True)

RAY_ADDRESS_HELP = (
    "Run on Ray: a cluster address (auto, host:6379, ray://host:10001) or 'local' to start Ray here. "
    "Needs the extra: pip install -e '.\\[ray]'."
)
"""Help of `--ray-address`, shared by the commands that run batches of simulations."""


def print_error(e: UserError) -> None:
    """`error: <file:line: field: message>` on stderr (the message printed as is, not as markup)."""
    err_console.print(f"[bold red]error:[/] {escape(e.one_line())}", highlight=False, soft_wrap=True)


def fail(e: UserError) -> NoReturn:
    """Report a user error and exit with status 2."""
    print_error(e)
    raise typer.Exit(2)


def split_list(text: str | None) -> list[str] | None:
    """A comma-separated option as a list (blank items dropped); None when the option was not given."""
    if text is None:
        return None
    return [x.strip() for x in text.split(",") if x.strip()]


def workload_overrides(trace: Path | None, fmt: str | None, max_requests: int | None, rate: float | None,
                       seed: int | None) -> dict[str, Any]:
    """Scenario overrides from the workload options of simulate, serve and replay (None: not given).

    A trace replaces the scenario's workload (synthetic one included); `rate` rescales arrivals to that mean
    rate (req/s) and so replaces any `time_scale`.
    """
    over: dict[str, Any] = {}
    wl: dict[str, Any] = {}
    if trace is not None:
        wl.update({"trace": str(trace.resolve()), "synthetic": None})
    if fmt is not None:
        wl["format"] = fmt
    if max_requests is not None:
        wl["max_requests"] = max_requests
    if rate is not None:
        wl.update({"target_rate_rps": rate, "time_scale": 1.0})
    if wl:
        over["workload"] = wl
    if seed is not None:
        over["seed"] = seed
    return over
