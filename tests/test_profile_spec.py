"""A scenario's profile section is EngineProfile's fields: their defaults, bounds and descriptions, and
errors in it named by file, line and field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qlmctl.errors import UserError
from qlmctl.scenario import ProfileSpec, load_scenario
from simulator.profile import EngineProfile

PROFILE_FILE = """\
# fitted on a test bench
base_s: 0.005
per_prefill_token_s: 4.0e-5
per_decode_seq_s: 2.0e-4
kv_blocks: 400
provenance: {gpu: H200, date: 2026-11-24}
"""

SCENARIO = """\
models:
  m:
    profile_file: profile.yaml
cluster:
  instances:
    - {model: m}
slo_classes:
  interactive: {ttft_s: 5}
workload:
  synthetic: {rate_rps: 5, num_requests: 10, prompt_tokens: 100, output_tokens: 20}
"""


def _write(tmp_path: Path, profile: str) -> tuple[Path, Path]:
    prof, scen = tmp_path / "profile.yaml", tmp_path / "scenario.yaml"
    prof.write_text(profile)
    scen.write_text(SCENARIO)
    return scen, prof


def test_the_section_has_every_profile_field_with_its_default_and_a_description():
    fields = {f.name: f for f in dataclasses.fields(EngineProfile) if f.name != "model"}
    assert set(ProfileSpec.model_fields) == set(fields) | {"provenance", "engine_flags"}
    for name, f in fields.items():
        info = ProfileSpec.model_fields[name]
        assert info.description, name
        if f.default is not dataclasses.MISSING:
            assert not info.is_required() and info.default == f.default, name
    # Kept positional in the dataclass (no default there), but a file may leave it out.
    assert ProfileSpec.model_fields["per_context_token_s"].default == 0.0
    assert {n for n, i in ProfileSpec.model_fields.items() if i.is_required()} == {
        "base_s", "per_prefill_token_s", "per_decode_seq_s", "kv_blocks"}


def test_a_short_profile_file_gives_the_dataclass_defaults(tmp_path: Path):
    scen, _ = _write(tmp_path, PROFILE_FILE)
    prof = load_scenario(scen).profile("m")
    # ... but for the engine flags it leaves out: vLLM's defaults on the instance's GPU (an H200: 1,024 sequences).
    assert prof == EngineProfile("m", 0.005, 4.0e-5, 2.0e-4, 0.0, 400, max_num_seqs=1024)


@pytest.mark.parametrize("change, field, line, message", [
    ("kv_blocks: 0", "kv_blocks", 5, "greater than 0"),
    ("base_s: -1", "base_s", 2, "greater than 0"),
    ("per_prefill_token_s: -1.0e-5", "per_prefill_token_s", 3, "greater than or equal to 0"),
    ("api_server_count: 0", "api_server_count", 7, "greater than or equal to 1"),
    ("knee_tokens: 1.5", "knee_tokens", 7, "integer"),
    ("base_ms: 0.005", "base_ms", 7, "Extra inputs"),
])
def test_a_bad_field_in_a_profile_file_is_named_with_its_file_and_line(tmp_path: Path, change, field, line,
                                                                      message):
    key = change.split(":")[0]
    lines = PROFILE_FILE.splitlines()
    hit = [i for i, text in enumerate(lines) if text.startswith(key + ":")]
    if hit:
        lines[hit[0]] = change
    else:
        lines.append(change)
    scen, prof = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message) as e:
        load_scenario(scen)
    assert (e.value.path, e.value.line, e.value.field) == (str(prof), line, field)


def test_a_missing_field_in_a_profile_file_is_named(tmp_path: Path):
    scen, prof = _write(tmp_path, PROFILE_FILE.replace("base_s: 0.005\n", ""))
    with pytest.raises(UserError, match="required") as e:
        load_scenario(scen)
    assert (e.value.path, e.value.field) == (str(prof), "base_s")


def test_a_bad_field_of_an_inline_profile_is_named_with_its_key_path(tmp_path: Path):
    scen, _ = _write(tmp_path, PROFILE_FILE)
    fields = PROFILE_FILE.replace("kv_blocks: 400", "kv_blocks: -3").splitlines()[1:5]
    inline = "\n".join("      " + ln for ln in fields)
    scen.write_text(SCENARIO.replace("    profile_file: profile.yaml", "    profile:\n" + inline))
    with pytest.raises(UserError, match="greater than 0") as e:
        load_scenario(scen)
    assert (e.value.path, e.value.line, e.value.field) == (str(scen), 7, "models.m.profile.kv_blocks")
