"""Writing, reading back and tabulating a run's results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console
from rich.text import Text

from qlmctl.core.request import Request
from qlmctl.metrics import requests_frame, summarize
from qlmctl.report import print_results, read_results, read_timeline, results_table, write_results


def run_requests() -> list[Request]:
    """Six requests (same outcomes as in test_metrics): 1 and 3 meet their SLO, 2 misses TTFT,
    4 misses TPOT, 5 never starts, 6 fails; duration 10 s."""

    def req(rid: int, arrival: float, cls: str, ttft_slo: float, tpot_slo: float | None,
            times: tuple[float, float, float] | None, generated: int,
            error: str | None = None) -> Request:
        r = Request(request_id=rid, arrival_s=arrival, model="m1" if rid < 3 else "m2",
                    slo_class=cls, ttft_slo_s=ttft_slo, prompt_tokens=10 * rid,
                    output_tokens=max(generated, 1), tpot_slo_s=tpot_slo, error=error)
        if times is not None:
            r.dispatch_s, r.first_token_s, r.finish_s = times
            r.generated_tokens, r.instance_id = generated, rid % 2
        return r

    return [
        req(1, 0.0, "interactive", 2.0, 1.0, (0.5, 1.0, 3.0), 5),
        req(2, 1.0, "interactive", 2.0, None, (1.0, 4.0, 5.0), 3),
        req(3, 2.0, "batch", 10.0, 0.1, (2.5, 3.0, 3.0), 1),
        req(4, 3.0, "batch", 10.0, 1.0, (3.0, 4.0, 10.0), 4),
        req(5, 4.0, "batch", 10.0, None, None, 0),
        req(6, 5.0, "batch", 10.0, None, (5.5, 6.0, 6.5), 2, error="engine died"),
    ]


ITLS = [[0.4, 0.6, 0.5, 0.5], [0.5, 0.5], [], [1.0, 2.0, 3.0], [], [9.0]]

SCENARIO = {"name": "unit", "seed": 3, "slo_classes": {"interactive": {"ttft_s": 2.0}}}


def _summary(**overrides: object) -> dict:
    s = summarize(run_requests(), instance_busy_s={"0": 5.0, "1": 10.0}, num_swaps=3, itls=ITLS)
    s.update(overrides)
    return s


def test_write_results_files_and_round_trip(tmp_path: Path) -> None:
    reqs = run_requests()
    summary = _summary()
    timeline = pd.DataFrame({"t_s": [0.0, 1.0], "event": ["arrival", "dispatch"]})

    folder = write_results(tmp_path / "out", "qlm", reqs, summary, SCENARIO, timeline)

    assert folder == tmp_path / "out" / "qlm"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["requests.parquet", "scenario.yaml", "summary.json", "timeline.parquet"]
    assert json.loads((folder / "summary.json").read_text()) == summary
    assert "\n  " in (folder / "summary.json").read_text()  # indented
    assert yaml.safe_load((folder / "scenario.yaml").read_text()) == SCENARIO

    back_summary, back_frame = read_results(folder)
    assert back_summary == summary
    expected = requests_frame(reqs)
    assert list(back_frame.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(
        back_frame.drop(columns=["error"]), expected.drop(columns=["error"]), check_dtype=False
    )
    assert back_frame["error"].isna().tolist() == [True] * 5 + [False]
    pd.testing.assert_frame_equal(read_timeline(folder), timeline, check_dtype=False)


def test_write_results_accepts_a_frame_and_drops_a_stale_timeline(tmp_path: Path) -> None:
    reqs = run_requests()
    write_results(tmp_path, "fcfs", reqs, _summary(), SCENARIO, pd.DataFrame({"t_s": [0.0]}))
    folder = write_results(tmp_path, "fcfs", requests_frame(reqs), _summary(), SCENARIO)
    assert not (folder / "timeline.parquet").exists()
    assert read_timeline(folder) is None


def test_csv_fallback_when_parquet_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = run_requests()
    write_results(tmp_path, "edf", reqs, _summary(), SCENARIO)  # a parquet from a first run

    def broken(*args: object, **kwargs: object) -> None:
        raise ImportError("no pyarrow")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    folder = write_results(tmp_path, "edf", reqs, _summary(), SCENARIO)
    assert (folder / "requests.csv").exists()
    assert not (folder / "requests.parquet").exists()  # the stale one must not shadow the csv
    summary, frame = read_results(folder)
    assert summary["completed"] == 4
    assert frame["request_id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert frame["ttft_s"].iloc[0] == pytest.approx(1.0)


def test_summary_json_has_no_nan_even_from_extra(tmp_path: Path) -> None:
    import numpy as np

    summary = _summary(note=float("nan"), count=np.int64(3), pair=(1, 2))
    folder = write_results(tmp_path, "p", run_requests(), summary, SCENARIO)
    back, _ = read_results(folder)
    assert back["note"] is None and back["count"] == 3 and back["pair"] == [1, 2]


def test_read_results_needs_a_requests_file(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path)


def _render(summaries: dict[str, dict], width: int) -> str:
    console = Console(record=True, width=width, color_system=None)
    print_results(console, summaries, "unit scenario")
    return console.export_text()


def test_table_renders_policies_and_attainment() -> None:
    summaries = {
        "fcfs": _summary(),
        "edf": _summary(slo_attainment=0.5),
        "qlm": _summary(slo_attainment=0.875, slo_attainment_by_class={"interactive": 1.0}),
    }
    text = _render(summaries, 120)
    assert "unit scenario" in text
    for name in summaries:
        assert name in text
    assert "33.3%" in text and "50.0%" in text and "87.5%" in text
    assert "100.0%" in text  # qlm's interactive class
    assert "Goodput (req/s)" in text and "0.20" in text
    assert "TTFT p99 (s)" in text and "2.94" in text  # 2940 ms shown in s
    assert "TPOT p50 (s)" in text  # TPOT p99 is 1970 ms, so the TPOT group is in s
    assert "4/6" in text
    assert "75.0%" in text  # mean utilisation


def test_table_highlights_best_attainment_and_fits_100_columns() -> None:
    summaries = {
        "fcfs": _summary(slo_attainment=0.61),
        "priority": _summary(slo_attainment=0.7),
        "edf": _summary(slo_attainment=0.72),
        "qlm": _summary(slo_attainment=0.93),
    }
    table = results_table(summaries, "four policies")
    first_cells = [next(iter(col.cells)) for col in table.columns[1:]]
    assert all(isinstance(c, Text) for c in first_cells)
    assert [str(c.style) for c in first_cells] == ["", "", "", "bold green"]

    text = _render(summaries, 100)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 100
    header = next(line for line in text.splitlines() if "fcfs" in line)
    for name in summaries:
        assert name in header  # no policy name folded


def test_table_handles_missing_values() -> None:
    empty = summarize([])
    text = _render({"a": empty, "b": _summary()}, 120)
    assert "–" in text and "a" in text and "b" in text
