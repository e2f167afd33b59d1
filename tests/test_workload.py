"""Requests from a scenario: mapping of models and classes, windowing, rescaling, determinism."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qlmctl.errors import UserError
from qlmctl.scenario import Scenario, ScenarioSpec
from qlmctl.traces import BURSTGPT_FAILED
from qlmctl.workload import BEFORE_START, BEYOND_MAX, build_requests

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"
BUNDLED = REPO / "traces" / "azure_conv_2023_first3000.csv"

BASE: dict[str, Any] = {
    "token_throughput": {"m": 3000},
    "cluster": {"instances": [{"model": "m"}]},
    "slo_classes": {"interactive": {"ttft_s": 20, "tpot_s": 0.1}, "batch": {"ttft_s": 3600}},
    "workload": {"trace": str(BUNDLED), "slo_class": {"split": {"interactive": 0.3, "batch": 0.7}}},
}


def _scenario(workload: dict[str, Any] | None = None, path: Path | None = None, **top: Any) -> Scenario:
    data = copy.deepcopy(BASE)
    if workload is not None:
        data["workload"] = workload
    data.update(top)
    return Scenario(ScenarioSpec.model_validate(data), path)


def _native(tmp_path: Path, rows: list[str]) -> Path:
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,model,slo_class,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    return p


def _key(reqs: list) -> list[tuple]:
    return [(r.request_id, r.arrival_s, r.model, r.slo_class, r.prompt_tokens, r.output_tokens) for r in reqs]


def test_basic_build() -> None:
    reqs, rep = build_requests(_scenario())
    assert len(reqs) == 3000 == rep.num_requests == rep.rows_read
    assert [r.request_id for r in reqs] == list(range(3000))
    arr = [r.arrival_s for r in reqs]
    assert arr[0] == 0.0 and arr == sorted(arr)
    assert {r.model for r in reqs} == {"m"}
    for r in reqs:
        if r.slo_class == "interactive":
            assert (r.ttft_slo_s, r.tpot_slo_s, r.priority) == (20.0, 0.1, 0)
        else:
            assert (r.ttft_slo_s, r.tpot_slo_s, r.priority) == (3600.0, None, 1)
    assert rep.format == "azure" and rep.source == str(BUNDLED)
    assert rep.per_model == {"m": 3000}
    assert sum(rep.per_class.values()) == 3000
    assert rep.duration_s == pytest.approx(arr[-1])
    assert rep.mean_rate_rps == pytest.approx(2999 / arr[-1])
    assert any("3000 requests" in line for line in rep.lines())


def test_deterministic_and_seeded() -> None:
    a, _ = build_requests(_scenario())
    b, _ = build_requests(_scenario())
    assert _key(a) == _key(b)
    c, _ = build_requests(_scenario(seed=1))
    assert [r.slo_class for r in a] != [r.slo_class for r in c]


def test_split_proportions() -> None:
    wl = {"synthetic": {"rate_rps": 10, "num_requests": 20_000, "prompt_tokens": 10, "output_tokens": 10},
          "slo_class": {"split": {"interactive": 1, "batch": 3}}}
    _, rep = build_requests(_scenario(wl))
    assert rep.per_class["interactive"] / 20_000 == pytest.approx(0.25, abs=0.015)
    assert rep.per_class["batch"] / 20_000 == pytest.approx(0.75, abs=0.015)


def test_model_split_and_constant() -> None:
    wl = {"trace": str(BUNDLED), "model": {"split": {"a": 0.5, "b": 0.5}}, "slo_class": {"constant": "batch"}}
    sc = _scenario(wl, token_throughput={"a": 1000, "b": 2000}, cluster={"instances": [{"model": "a"}]})
    _, rep = build_requests(sc)
    assert set(rep.per_model) == {"a", "b"}
    assert rep.per_model["a"] / 3000 == pytest.approx(0.5, abs=0.05)
    assert rep.per_class == {"batch": 3000}


def test_time_scale() -> None:
    base, _ = build_requests(_scenario())
    wl = copy.deepcopy(BASE["workload"]) | {"time_scale": 0.5}
    scaled, _ = build_requests(_scenario(wl))
    np.testing.assert_allclose([r.arrival_s for r in scaled], [r.arrival_s * 0.5 for r in base])


def test_target_rate() -> None:
    wl = copy.deepcopy(BASE["workload"]) | {"target_rate_rps": 20.0}
    reqs, rep = build_requests(_scenario(wl))
    assert (len(reqs) - 1) / reqs[-1].arrival_s == pytest.approx(20.0)
    assert rep.mean_rate_rps == pytest.approx(20.0)
    # Holds for the requests actually replayed, also under a cap.
    wl["max_requests"] = 500
    reqs, rep = build_requests(_scenario(wl))
    assert len(reqs) == 500
    assert (len(reqs) - 1) / reqs[-1].arrival_s == pytest.approx(20.0)


def test_max_requests_caps_and_reports() -> None:
    wl = copy.deepcopy(BASE["workload"]) | {"max_requests": 100}
    reqs, rep = build_requests(_scenario(wl))
    assert len(reqs) == 100 == rep.num_requests
    assert rep.skipped == {BEYOND_MAX: 2900}
    assert rep.num_requests + sum(rep.skipped.values()) == rep.rows_read
    assert any("2900" in line and BEYOND_MAX in line for line in rep.lines())
    full, _ = build_requests(_scenario())
    assert [r.arrival_s for r in reqs] == [r.arrival_s for r in full[:100]]


def test_start_s(tmp_path: Path) -> None:
    p = _native(tmp_path, [f"{t},,,1,1" for t in (0, 1, 2, 5, 7)])
    reqs, rep = build_requests(_scenario({"trace": str(p), "slo_class": {"constant": "batch"}, "start_s": 2}))
    assert [r.arrival_s for r in reqs] == [0.0, 3.0, 5.0]
    assert rep.skipped == {BEFORE_START: 2}
    with pytest.raises(UserError) as e:
        build_requests(_scenario({"trace": str(p), "slo_class": {"constant": "batch"}, "start_s": 100}))
    assert e.value.field == "workload.start_s"


def test_trace_columns_used_by_default(tmp_path: Path) -> None:
    p = _native(tmp_path, ["0,a,interactive,1,1", "1,b,batch,2,2", "2,a,batch,3,3"])
    sc = _scenario({"trace": str(p)}, token_throughput={"a": 1, "b": 1}, cluster={"instances": [{"model": "a"}]})
    reqs, rep = build_requests(sc)
    assert [(r.model, r.slo_class) for r in reqs] == [("a", "interactive"), ("b", "batch"), ("a", "batch")]
    assert rep.per_model == {"a": 2, "b": 1}


def test_column_mapping_unknown_value_names_line(tmp_path: Path) -> None:
    p = _native(tmp_path, ["0,a,batch,1,1", "1,a,batch,1,1", "2,zz,batch,1,1"])
    sc = _scenario({"trace": str(p), "model": {"column": "model"}}, token_throughput={"a": 1, "b": 1},
                   cluster={"instances": [{"model": "a"}]})
    with pytest.raises(UserError, match="zz") as e:
        build_requests(sc)
    assert (e.value.path, e.value.line, e.value.field) == (str(p), 4, "model")


def test_burstgpt_model_column_names_file_column(tmp_path: Path) -> None:
    p = tmp_path / "b.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "1,ChatGPT,5,5,10,API log\n2,GPT-4,5,0,5,API log\n3,GPT-4,5,5,10,API log\n"
    )
    sc = _scenario({"trace": str(p), "model": {"column": "model"}, "slo_class": {"constant": "batch"}},
                   token_throughput={"ChatGPT": 1, "llama": 1}, cluster={"instances": [{"model": "llama"}]})
    with pytest.raises(UserError) as e:
        build_requests(sc)
    assert (e.value.line, e.value.field) == (4, "Model")
    # With a single model, an unusable trace model column is set aside, and said so.
    sc = _scenario({"trace": str(p), "slo_class": {"constant": "batch"}})
    reqs, rep = build_requests(sc)
    assert {r.model for r in reqs} == {"m"}
    assert rep.skipped == {BURSTGPT_FAILED: 1}
    assert any("not used" in n for n in rep.notes)


def test_ambiguous_assignment_asks_for_mapping(tmp_path: Path) -> None:
    sc = _scenario({"trace": str(BUNDLED), "slo_class": {"constant": "batch"}},
                   token_throughput={"a": 1, "b": 1}, cluster={"instances": [{"model": "a"}]})
    with pytest.raises(UserError) as e:
        build_requests(sc)
    assert e.value.field == "workload.model"
    with pytest.raises(UserError) as e:
        build_requests(_scenario({"trace": str(BUNDLED)}))
    assert e.value.field == "workload.slo_class"


def test_single_class_default() -> None:
    reqs, rep = build_requests(_scenario({"trace": str(BUNDLED)}, slo_classes={"only": {"ttft_s": 5}}))
    assert rep.per_class == {"only": 3000}


def test_unknown_names_in_mappings() -> None:
    for wl, field in [
        ({"trace": str(BUNDLED), "slo_class": {"constant": "nope"}}, "workload.slo_class.constant"),
        ({"trace": str(BUNDLED), "slo_class": {"split": {"batch": 1, "nope": 1}}}, "workload.slo_class.split.nope"),
        ({"trace": str(BUNDLED), "slo_class": {"column": "colour"}}, "workload.slo_class.column"),
        (
            {"trace": str(BUNDLED), "slo_class": {"constant": "batch"}, "model": {"constant": "x"}},
            "workload.model.constant",
        ),
    ]:
        with pytest.raises(UserError) as e:
            build_requests(_scenario(wl))
        assert e.value.field == field


def test_relative_trace_path(tmp_path: Path) -> None:
    p = _native(tmp_path, ["0,,,1,1", "1,,,1,1"])
    sc = _scenario({"trace": p.name, "slo_class": {"constant": "batch"}}, path=tmp_path / "scenario.yaml")
    reqs, rep = build_requests(sc)
    assert len(reqs) == 2 and rep.source == str(p)


def test_synthetic_lengths_from_and_report() -> None:
    wl = {"synthetic": {"rate_rps": 4, "num_requests": 1000, "lengths_from": str(BUNDLED)},
          "slo_class": {"constant": "interactive"}}
    reqs, rep = build_requests(_scenario(wl))
    assert rep.source == "synthetic" and rep.format == "synthetic" and rep.num_requests == 1000
    assert rep.mean_rate_rps == pytest.approx(4, rel=0.15)
    assert len({r.prompt_tokens for r in reqs}) > 100


def test_million_synthetic_requests_fast() -> None:
    import time

    wl = {"synthetic": {"rate_rps": 100, "num_requests": 1_000_000, "lengths_from": str(BUNDLED)},
          "slo_class": {"split": {"interactive": 0.5, "batch": 0.5}}}
    start = time.perf_counter()
    reqs, rep = build_requests(_scenario(wl))
    assert time.perf_counter() - start < 10.0
    assert len(reqs) == 1_000_000 and reqs[-1].request_id == 999_999


def test_real_burstgpt() -> None:
    path = SHARED_TRACES / "burstgpt_1_first7days.csv"
    if not path.exists():
        pytest.skip(f"{path} absent")
    sc = _scenario({"trace": str(path), "model": {"column": "model"}, "slo_class": {"constant": "batch"}},
                   token_throughput={"ChatGPT": 1000, "GPT-4": 500}, cluster={"instances": [{"model": "GPT-4"}]})
    reqs, rep = build_requests(sc)
    assert rep.rows_read == 19431
    assert rep.num_requests + rep.skipped[BURSTGPT_FAILED] == 19431
    assert set(rep.per_model) == {"ChatGPT", "GPT-4"}
    assert any(BURSTGPT_FAILED in line for line in rep.lines())
