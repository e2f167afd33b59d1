"""Trace loading: every format, auto-detection, validation with line and column, synthetic traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlmctl.errors import UserError
from qlmctl.scenario import SyntheticSpec
from qlmctl.traces import BURSTGPT_FAILED, COLUMNS, load_trace, synthetic_trace, write_native_csv

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"
BUNDLED = REPO / "traces" / "azure_conv_2023_first3000.csv"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _check_frame(frame: pd.DataFrame) -> None:
    assert list(frame.columns) in (list(COLUMNS), [*COLUMNS, "prefix_hashes"])
    assert frame["arrival_s"].dtype == np.float64
    for c in ("prompt_tokens", "output_tokens", "source_line"):
        assert frame[c].dtype == np.int64
    for c in ("model", "slo_class"):
        assert frame[c].dtype == object
    assert frame["arrival_s"].iloc[0] == 0.0
    assert frame["arrival_s"].is_monotonic_increasing
    assert (frame["prompt_tokens"] >= 1).all() and (frame["output_tokens"] >= 1).all()


# --- each format ---------------------------------------------------------------------------


def test_native(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "t.csv",
        "arrival_s,model,slo_class,prompt_tokens,output_tokens\n"
        "10.5,a,interactive,100,20\n"
        "10.0,,batch,50,5\n"
        "12.0,b,,7,1\n",
    )
    t = load_trace(p)
    _check_frame(t.frame)
    assert t.format == "qlmctl" and t.rows_read == 3 and t.skipped == {}
    f = t.frame
    assert f["arrival_s"].tolist() == [0.0, 0.5, 2.0]
    assert f["model"].tolist() == [None, "a", "b"]
    assert f["slo_class"].tolist() == ["batch", "interactive", None]
    assert f["prompt_tokens"].tolist() == [50, 100, 7]
    assert f["source_line"].tolist() == [3, 2, 4]


def test_native_without_optional_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "prompt_tokens,output_tokens,arrival_s\n5,6,1.0\n7,8,0.0\n")
    t = load_trace(p)
    assert t.format == "qlmctl"
    assert t.frame["model"].tolist() == [None, None]
    assert t.frame["slo_class"].tolist() == [None, None]
    assert t.frame["prompt_tokens"].tolist() == [7, 5]
    assert "model" not in t.source_columns


def test_azure(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "a.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:46.6805900,10,1\n",
    )
    t = load_trace(p)
    _check_frame(t.frame)
    assert t.format == "azure"
    assert t.frame["arrival_s"].tolist() == pytest.approx([0.0, 4.314579, 60.0], abs=1e-6)
    assert t.frame["prompt_tokens"].tolist() == [374, 396, 10]
    assert t.frame["output_tokens"].tolist() == [44, 109, 1]
    assert t.frame["model"].isna().all()


def test_burstgpt_skips_failed(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,GPT-4,0,0,0,Conversation log\n"
        "50,GPT-4,1087,230,1317,API log\n"
        "60,ChatGPT,12,0,12,Conversation log\n",
    )
    t = load_trace(p)
    _check_frame(t.frame)
    assert t.format == "burstgpt"
    assert t.rows_read == 4 and len(t) == 2
    assert t.skipped == {BURSTGPT_FAILED: 2}
    assert t.frame["model"].tolist() == ["ChatGPT", "GPT-4"]
    assert t.frame["arrival_s"].tolist() == [0.0, 45.0]
    assert t.frame["source_line"].tolist() == [2, 4]
    assert t.source_columns["model"] == "Model"


def test_burstgpt_zero_prompt_with_output_is_an_error(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "6,ChatGPT,0,18,18,Conversation log\n",
    )
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert (e.value.line, e.value.field) == (3, "Request tokens")


def test_mooncake(tmp_path: Path) -> None:
    recs = [
        {"timestamp": 3000, "input_length": 100, "output_length": 10, "hash_ids": [0, 1]},
        {"timestamp": 0, "input_length": 200, "output_length": 20, "hash_ids": [2]},
        {"timestamp": 1500, "input_length": 300, "output_length": 30, "hash_ids": []},
    ]
    p = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")
    t = load_trace(p)
    _check_frame(t.frame)
    assert t.format == "mooncake"
    assert t.frame["arrival_s"].tolist() == [0.0, 1.5, 3.0]  # milliseconds -> seconds
    assert t.frame["prompt_tokens"].tolist() == [200, 300, 100]
    assert t.frame["source_line"].tolist() == [2, 3, 1]
    # Its prompt block hashes (512 tokens each), in arrival order, for prefix caching.
    assert t.hash_block_tokens == 512 and t.frame["prefix_hashes"].tolist() == [(2,), None, (0, 1)]


def test_vidur(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "v.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens,extra\n1.0,10,2,x\n1.25,20,4,y\n",
    )
    t = load_trace(p)
    _check_frame(t.frame)
    assert t.format == "vidur"
    assert t.frame["arrival_s"].tolist() == [0.0, 0.25]
    assert t.frame["output_tokens"].tolist() == [2, 4]


def test_forced_format(tmp_path: Path) -> None:
    p = _write(tmp_path, "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n1.0,10,2\n")
    assert load_trace(p, "vidur").format == "vidur"
    with pytest.raises(UserError) as e:
        load_trace(p, "azure")
    assert e.value.line == 1 and e.value.field == "TIMESTAMP"
    with pytest.raises(UserError, match="supported"):
        load_trace(p, "parquet")


def test_stable_sort_of_ties(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n1,1,1\n0,2,2\n1,3,3\n0,4,4\n")
    f = load_trace(p).frame
    assert f["prompt_tokens"].tolist() == [2, 4, 1, 3]


def test_blank_lines_ignored_and_lines_kept(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n\n1,2,x\n")
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert (e.value.line, e.value.field) == (4, "output_tokens")
    p2 = _write(tmp_path, "t2.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n\n1,2,2\n\n")
    t = load_trace(p2)
    assert t.rows_read == 2 and t.frame["source_line"].tolist() == [2, 4]


# --- auto-detection and errors -----------------------------------------------------------------


def test_unknown_header(tmp_path: Path) -> None:
    p = _write(tmp_path, "x.csv", "time,in,out\n1,2,3\n")
    with pytest.raises(UserError) as e:
        load_trace(p)
    msg = str(e.value)
    for name in ("qlmctl", "azure", "burstgpt", "mooncake", "vidur"):
        assert name in msg
    assert e.value.line == 1


def test_unknown_json(tmp_path: Path) -> None:
    p = _write(tmp_path, "x.jsonl", '{"t": 1, "in": 2}\n')
    with pytest.raises(UserError, match="supported"):
        load_trace(p)


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "arrival_s,prompt_tokens,output_tokens\n", "TIMESTAMP,ContextTokens,GeneratedTokens\n\n"],
)
def test_empty_trace(tmp_path: Path, text: str) -> None:
    p = _write(tmp_path, "e.csv", text)
    with pytest.raises(UserError, match="empty"):
        load_trace(p)


def test_all_rows_skipped_is_empty(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,ChatGPT,0,0,0,API log\n",
    )
    with pytest.raises(UserError, match="empty"):
        load_trace(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_trace(tmp_path / "nope.csv")


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_OK = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize(
    ("bad_row", "field", "match"),
    [
        ("2023-11-16 18:15:49.1,374,abc\n", "GeneratedTokens", "not a number"),
        ("2023-11-16 18:15:49.1,374,\n", "GeneratedTokens", "missing"),
        ("2023-11-16 18:15:49.1,-3,4\n", "ContextTokens", "negative"),
        ("2023-11-16 18:15:49.1,3.5,4\n", "ContextTokens", "whole number"),
        ("2023-11-16 18:15:49.1,0,4\n", "ContextTokens", "at least 1"),
        ("2023-11-16 18:15:49.1,5,0\n", "GeneratedTokens", "at least 1"),
        ("yesterday,5,4\n", "TIMESTAMP", "date-time"),
        (",5,4\n", "TIMESTAMP", "missing"),
        ("2023-11-16 18:15:49.1,5\n", "GeneratedTokens", "missing"),
    ],
)
def test_bad_row_names_line_and_field(tmp_path: Path, bad_row: str, field: str, match: str) -> None:
    # Header is line 1, so the bad row is line 4; a later bad row must not be reported first.
    p = _write(tmp_path, "a.csv", AZURE_HEADER + AZURE_OK + AZURE_OK + bad_row + "garbage,x,y\n")
    with pytest.raises(UserError, match=match) as e:
        load_trace(p)
    assert e.value.line == 4
    assert e.value.field == field
    assert e.value.path == str(p)


def test_earliest_bad_line_wins_across_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n1,2,-1\n2,x,1\n")
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert (e.value.line, e.value.field) == (3, "output_tokens")


def test_malformed_csv_row(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n1,2,3,4\n")
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert e.value.line == 3


def test_leading_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    p = _write(tmp_path, "t.csv", "\n\narrival_s,prompt_tokens,output_tokens\n0,1,1\n1,x,3\n")
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert (e.value.line, e.value.field) == (5, "prompt_tokens")
    p = _write(tmp_path, "t2.csv", "\narrival_s,prompt_tokens,output_tokens\n0,1,1\n")
    assert load_trace(p).frame["source_line"].tolist() == [3]


def test_mooncake_errors(tmp_path: Path) -> None:
    good = json.dumps({"timestamp": 0, "input_length": 1, "output_length": 1})
    p = _write(tmp_path, "m.jsonl", good + "\n" + '{"timestamp": 5, "input_length": "many", "output_length": 1}\n')
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert (e.value.line, e.value.field) == (2, "input_length")
    p = _write(tmp_path, "m2.jsonl", good + "\n" + good + "\n{not json\n")
    with pytest.raises(UserError, match="JSON") as e:
        load_trace(p)
    assert e.value.line == 3
    p = _write(tmp_path, "m3.jsonl", good + "\n" + '{"timestamp": 5, "input_length": 3}\n')
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert (e.value.line, e.value.field) == (2, "output_length")


# --- bundled and real traces -------------------------------------------------------------------


def test_bundled_slice() -> None:
    t = load_trace(BUNDLED)
    _check_frame(t.frame)
    assert t.format == "azure" and len(t) == 3000 and t.rows_read == 3000


def _shared(name: str) -> Path:
    p = SHARED_TRACES / name
    if not p.exists():
        pytest.skip(f"{p} absent")
    return p


@pytest.mark.parametrize(
    ("name", "fmt", "rows"),
    [
        ("azure_llm_2023_conv.csv", "azure", 19366),
        ("burstgpt_1_first7days.csv", "burstgpt", 19431),
        ("mooncake_conversation_trace.jsonl", "mooncake", 12031),
    ],
)
def test_real_traces(name: str, fmt: str, rows: int) -> None:
    # (How fast they load is a benchmark's, bench/bench_traces.py: a wall-clock bound here failed on a busy host.)
    path = _shared(name)
    t = load_trace(path)
    _check_frame(t.frame)
    assert t.format == fmt
    assert t.rows_read == rows
    assert len(t) + sum(t.skipped.values()) == rows
    if fmt == "burstgpt":
        raw = pd.read_csv(path)
        assert t.skipped == {BURSTGPT_FAILED: int((raw["Response tokens"] == 0).sum())}
        assert t.skipped[BURSTGPT_FAILED] > 0
        assert set(t.frame["model"]) == {"ChatGPT", "GPT-4"}
    else:
        assert t.skipped == {}


# --- synthetic ---------------------------------------------------------------------------------


def _gap_cv(frame: pd.DataFrame) -> float:
    gaps = np.diff(frame["arrival_s"].to_numpy())
    return float(gaps.std() / gaps.mean())


def test_synthetic_poisson_rate() -> None:
    spec = SyntheticSpec(rate_rps=5.0, num_requests=20_000, prompt_tokens=100, output_tokens=10)
    t = synthetic_trace(spec, np.random.default_rng(1), None)
    _check_frame(t.frame)
    f = t.frame
    assert t.format == "synthetic" and len(f) == 20_000 and t.path is None
    rate = (len(f) - 1) / f["arrival_s"].iloc[-1]
    assert rate == pytest.approx(5.0, rel=0.05)
    assert _gap_cv(f) == pytest.approx(1.0, abs=0.05)
    assert (f["prompt_tokens"] == 100).all() and (f["output_tokens"] == 10).all()


def test_synthetic_gamma_is_burstier() -> None:
    base = dict(rate_rps=5.0, num_requests=20_000, prompt_tokens=1, output_tokens=1)
    poisson = synthetic_trace(SyntheticSpec(**base), np.random.default_rng(2), None).frame
    gamma = synthetic_trace(SyntheticSpec(arrival="gamma", cv=3.0, **base), np.random.default_rng(2), None).frame
    assert _gap_cv(gamma) > 2.0 > _gap_cv(poisson)
    assert (len(gamma) - 1) / gamma["arrival_s"].iloc[-1] == pytest.approx(5.0, rel=0.15)


def test_synthetic_resamples_pairs() -> None:
    lengths = pd.DataFrame({"prompt_tokens": [10, 20, 30], "output_tokens": [1, 2, 3]})
    spec = SyntheticSpec(rate_rps=1.0, num_requests=500)
    f = synthetic_trace(spec, np.random.default_rng(3), lengths).frame
    assert (f["prompt_tokens"] == f["output_tokens"] * 10).all()  # pairs kept together
    assert set(f["prompt_tokens"]) == {10, 20, 30}
    spec = SyntheticSpec(rate_rps=1.0, num_requests=50, output_tokens=7)
    fixed_out = synthetic_trace(spec, np.random.default_rng(3), lengths)
    assert (fixed_out.frame["output_tokens"] == 7).all()


def test_synthetic_deterministic() -> None:
    spec = SyntheticSpec(arrival="gamma", cv=2.0, rate_rps=3.0, num_requests=100, prompt_tokens=5, output_tokens=5)
    a = synthetic_trace(spec, np.random.default_rng(7), None).frame
    b = synthetic_trace(spec, np.random.default_rng(7), None).frame
    pd.testing.assert_frame_equal(a, b)


def test_synthetic_needs_lengths() -> None:
    with pytest.raises(UserError) as e:
        synthetic_trace(SyntheticSpec(rate_rps=1.0, num_requests=5, prompt_tokens=3), np.random.default_rng(0), None)
    assert e.value.field == "workload.synthetic.output_tokens"


def test_synthetic_one_request() -> None:
    spec = SyntheticSpec(rate_rps=1.0, num_requests=1, prompt_tokens=1, output_tokens=1)
    t = synthetic_trace(spec, np.random.default_rng(0), None)
    assert t.frame["arrival_s"].tolist() == [0.0]


# --- round trip --------------------------------------------------------------------------------

_names = st.one_of(
    st.none(),
    st.text(st.characters(codec="utf-8", exclude_categories=("C", "Z")), min_size=1, max_size=8),
    st.sampled_from(["NA", "null", "a,b", 'q"t', "0", "None"]),
)
_rows = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False),
        _names,
        _names,
        st.integers(min_value=1, max_value=2**31 - 1),
        st.integers(min_value=1, max_value=10**6),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows)
def test_native_round_trip(tmp_path: Path, rows: list[tuple[float, str | None, str | None, int, int]]) -> None:
    rows = sorted(rows, key=lambda r: r[0])
    first = rows[0][0]
    # Arrivals that already start at 0 come back bit for bit (the load's shift subtracts 0.0).
    rows = [(a - first, m, c, p, o) for a, m, c, p, o in rows]
    frame = pd.DataFrame(
        {
            "arrival_s": [r[0] for r in rows],
            "model": pd.Series([r[1] for r in rows], dtype=object),
            "slo_class": pd.Series([r[2] for r in rows], dtype=object),
            "prompt_tokens": [r[3] for r in rows],
            "output_tokens": [r[4] for r in rows],
        }
    )
    path = tmp_path / "rt.csv"
    write_native_csv(frame, path)
    t = load_trace(path)
    assert t.format == "qlmctl" and t.rows_read == len(rows)
    back = t.frame
    assert back["arrival_s"].tolist() == frame["arrival_s"].tolist()
    assert back["prompt_tokens"].tolist() == frame["prompt_tokens"].tolist()
    assert back["output_tokens"].tolist() == frame["output_tokens"].tolist()
    assert back["model"].tolist() == frame["model"].tolist()
    assert back["slo_class"].tolist() == frame["slo_class"].tolist()
    assert back["source_line"].tolist() == list(range(2, len(rows) + 2))


def test_a_row_with_extra_fields_is_an_error_not_dropped(tmp_path):
    from qlmctl.errors import UserError
    from qlmctl.traces import load_trace

    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,10,5,99\n")
    with pytest.raises(UserError) as e:
        load_trace(p)
    assert e.value.line == 3 and "4 fields" in e.value.message
