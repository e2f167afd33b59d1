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


def workload_overrides(trace: Path | None, fmt: str | None, max_requests: int | None, rate: str | float | None,
                       seed: int | None, burstiness: float | None = None, duration: float | None = None,
                       scenario: Path | None = None) -> dict[str, Any]:
    """Scenario overrides from the workload options of simulate, serve and replay (None: not given).

    A trace replaces the scenario's workload (synthetic one included); `rate` (req/s, or inf) rescales
    arrivals to that mean rate and so replaces any `time_scale` (a synthetic workload gets it as its rate);
    `burstiness` draws arrivals anew as vLLM does; `duration` fills that many seconds with arrivals.
    Raises UserError for a bad rate, naming the option.
    """
    from qlmctl.vllm_bench import parse_rate

    value = parse_rate(rate)
    over: dict[str, Any] = {}
    wl: dict[str, Any] = {}
    if trace is not None:
        wl.update({"trace": str(trace.resolve()), "synthetic": None})
    if fmt is not None:
        wl["format"] = fmt
    if max_requests is not None:
        wl["max_requests"] = max_requests
    if value is not None:
        if trace is None and _synthetic(scenario):
            wl["synthetic"] = {"rate_rps": value}
        else:
            wl.update({"target_rate_rps": value, "time_scale": 1.0})
    if burstiness is not None:
        wl["burstiness"] = burstiness
    if duration is not None:
        wl["duration_s"] = duration
    if wl:
        over["workload"] = wl
    if seed is not None:
        over["seed"] = seed
    return over


def _synthetic(scenario: Path | None) -> bool:
    """Whether the scenario file's workload is synthetic (a rate then sets its rate_rps)."""
    from qlmctl.scenario import DEFAULT_SCENARIO, read_yaml

    try:
        data = read_yaml(Path(scenario) if scenario is not None else DEFAULT_SCENARIO)
    except UserError:
        return False  # loading it reports the error
    wl = data.get("workload") if isinstance(data, dict) else None
    return isinstance(wl, dict) and wl.get("synthetic") is not None and wl.get("trace") is None


def split_items(values: list[str] | None) -> list[str]:
    """Repeated options whose values may each hold several items: `--metadata a=1 --metadata "b=2 c=3"`."""
    return [item for v in values or () for item in v.replace(",", " ").split() if item]


def prepare_out(out: Path | None, name: str, force: bool, labels: list[str]) -> Path:
    """The folder a run's results go to, made ready: a new `results/<name>/<date-time>/` (with
    `results/<name>/latest` pointing to it), or `out`, where the run's own sub-folders (`labels`: its
    policies) must not hold results yet unless `force`, which removes them first. Other runs' folders
    there are left alone (`qlmctl plot` tells runs of different workloads apart).
    """
    import datetime as dt
    import shutil

    if out is None:
        base = Path("results") / name
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder, k = base / stamp, 1
        while folder.exists():
            k += 1
            folder = base / f"{stamp}-{k}"
        folder.mkdir(parents=True)
        latest = base / "latest"
        try:
            if latest.is_symlink() or not latest.exists():
                latest.unlink(missing_ok=True)
                latest.symlink_to(folder.name, target_is_directory=True)
        except OSError:
            pass  # no symlinks here (some file systems): the printed path is enough
        return folder
    out = Path(out)
    held = [out / lab for lab in labels if (out / lab / "summary.json").is_file()]
    if held and not force:
        raise UserError(f"already holds results of {', '.join(p.name for p in held)}; pass --force to replace "
                        f"them, or give another --out (without --out, each run gets a folder of its own)", out,
                        field="--out")
    for p in held:
        shutil.rmtree(p)
    return out  # made when the first results are written


# Options shared by the commands that run a workload (simulate, replay, serve --replay), with vLLM's names.
REQUEST_RATE_HELP = ("Rescale arrivals to this mean rate, requests/s (vllm bench serve's --request-rate; inf: every "
                     "request at time 0). A synthetic workload gets it as its rate.")
BURSTINESS_HELP = ("Draw arrival times anew as vllm bench serve does: gamma gaps of this shape at the rate (1: "
                   "Poisson; below 1 burstier, above 1 smoother).")
DURATION_HELP = "Seconds of arrivals to replay: a trace is repeated end to end to fill them (and cut there)."
METRIC_PERCENTILES_HELP = "Also report these percentiles (vLLM's --metric-percentiles), e.g. 25,50,99.9."
PERCENTILE_METRICS_HELP = "Metrics the extra percentiles are for: ttft,tpot,itl,e2el (default all)."
GOODPUT_HELP = ("vLLM's goodput: METRIC:MS thresholds (ttft, tpot, e2el), e.g. --goodput ttft:500 --goodput tpot:50; "
                "request_goodput then counts requests within all of them (the SLO classes' goodput stays as slo_goodput).")
METADATA_HELP = "KEY=VALUE pairs recorded in summary.json (and the result file), as vLLM's --metadata; repeatable."
SAVE_RESULT_HELP = "Also write vLLM's result file per policy (a vllm bench serve JSON: plot and compare read it)."
SAVE_DETAILED_HELP = "With the result file, the per-request arrays (input_lens, ttfts, itls, ...), as vLLM's --save-detailed."
RESULT_DIR_HELP = "Folder of the result file (default: the current folder, as vLLM)."
RESULT_FILENAME_HELP = "Name of the result file (default vLLM's: `<label>-<rate>qps-<model>-<date>.json`)."
FORCE_HELP = "Replace the results of the same policies (labels) already in --out (by default a run refuses to overwrite them)."
