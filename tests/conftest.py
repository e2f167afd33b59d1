"""Shared fixtures: small profiles and scenarios built in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"


def small_profile(**over) -> EngineProfile:
    fields = dict(model="m", base_s=0.005, per_prefill_token_s=4e-5, per_decode_seq_s=2e-4,
                  per_context_token_s=1e-7, kv_blocks=400, block_size=16, max_num_seqs=16,
                  max_num_batched_tokens=512, max_model_len=4096, load_cold_s=5.0, load_warm_s=0.5)
    fields.update(over)
    return EngineProfile(**fields)


def make_scenario(instances: int = 2, models: tuple[str, ...] = ("m",), kv_blocks: int = 400,
                  max_num_seqs: int = 16, workload: dict | None = None, **extra) -> Scenario:
    prof = {k: v for k, v in small_profile(kv_blocks=kv_blocks, max_num_seqs=max_num_seqs).__dict__.items()} \
        if hasattr(small_profile(), "__dict__") else None
    p = small_profile(kv_blocks=kv_blocks, max_num_seqs=max_num_seqs)
    prof = {f: getattr(p, f) for f in p.__dataclass_fields__ if f != "model"}
    spec = {
        "models": {m: {"profile": prof} for m in models},
        "cluster": {"instances": [{"model": models[i % len(models)]} for i in range(instances)]},
        "slo_classes": {"interactive": {"ttft_s": 5}, "batch": {"ttft_s": 120}},
        "workload": workload or {"synthetic": {"rate_rps": 5, "num_requests": 10, "prompt_tokens": 100,
                                               "output_tokens": 20}},
    }
    spec.update(extra)
    return Scenario(ScenarioSpec.model_validate(spec))


@pytest.fixture
def scenario() -> Scenario:
    return make_scenario()


@pytest.fixture(autouse=True)
def _private_launch_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --launch` records its engines in a per-user folder (`$XDG_RUNTIME_DIR/qlmctl`, else
    `<tmp>/qlmctl-<uid>`, `qlmctl.gateway.launchstate`) and reads them back at the next launch. Each test
    gets a folder of its own (its subprocesses inherit the setting), so that tests on parallel workers (and
    gateways of the person running them) neither see nor clean up each other's records."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
