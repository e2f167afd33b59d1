"""Engine flags: a simulated engine runs with the scenario's flags, else vLLM's defaults for its GPU; a profile
records what it was measured with, and a difference is warned about."""

from __future__ import annotations

import pytest

from qlmctl.engine_defaults import canonical_gpu, vllm_defaults
from qlmctl.errors import UserError
from qlmctl.scenario import REPO_ROOT, flags_from_command, load_scenario

DEFAULT = REPO_ROOT / "scenarios" / "default.yaml"


def _cluster(**line):
    return {"cluster": {"instances": [{"count": 2, "gpu": "H200", "model": "llama-3.1-8b", **line}]}}


def test_vllm_defaults_follow_the_gpu():
    assert vllm_defaults("H200")["max_num_seqs"] == 1024 and vllm_defaults("h100")["max_num_batched_tokens"] == 8192
    assert vllm_defaults("MI300X")["max_num_seqs"] == 1024
    # vLLM keeps the small defaults on the A100 whatever its memory, and on small GPUs.
    assert vllm_defaults("A100")["max_num_seqs"] == 256 and vllm_defaults("A100")["max_num_batched_tokens"] == 2048
    assert vllm_defaults("L4")["max_num_seqs"] == 256
    assert canonical_gpu("nvidia h200") == "H200" and canonical_gpu("H201") is None


def test_the_bundled_profile_runs_with_vllms_defaults_not_its_profiling_flags():
    sc = load_scenario(DEFAULT)
    prof = sc.profile("llama-3.1-8b")
    assert prof.max_num_seqs == 1024 and prof.max_num_batched_tokens == 8192 and prof.enable_prefix_caching
    assert prof.max_model_len == 8192  # the profile's: vLLM takes it from the model
    # The profile says what it was measured with, and the difference is one warning.
    (warning,) = sc.engine_mismatches()
    assert "max_num_seqs 256" in warning and "1024 (vLLM default)" in warning and "prefix caching off" in warning
    assert sc.engine_notes() == ["engine llama-3.1-8b on H200: max_num_seqs 1024, max_num_batched_tokens 8192, "
                                 "max_model_len 8192, block_size 16, prefix caching on, api_server_count 1"]


def test_scenario_flags_win_and_silence_the_warning():
    sc = load_scenario(DEFAULT, _cluster(engine={"max_num_seqs": 256, "enable_prefix_caching": False}))
    assert sc.profile("llama-3.1-8b").max_num_seqs == 256
    assert sc.engine_mismatches() == []
    flags, origin = sc.engine_flags("llama-3.1-8b", "H200", sc.spec.cluster.instances[0].engine)
    assert origin["max_num_seqs"] == "scenario" and origin["max_num_batched_tokens"] == "vLLM default on H200"


def test_block_size_keeps_the_kv_memory_and_profile_overrides_still_win():
    base = load_scenario(DEFAULT).profile("llama-3.1-8b")
    sc = load_scenario(DEFAULT, _cluster(engine={"block_size": 32}, profile_overrides={"max_num_seqs": 64}))
    inst = sc.spec.cluster.instances[0]
    prof = sc.profile("llama-3.1-8b", inst.gpu, inst.profile_overrides, inst.engine)
    assert prof.block_size == 32 and prof.kv_blocks == base.kv_blocks * 16 // 32
    assert prof.max_num_seqs == 64


def test_a_gpu_changes_the_defaults_and_an_unknown_gpu_is_refused():
    sc = load_scenario(DEFAULT, _cluster(gpu="A100"))
    assert sc.profile("llama-3.1-8b").max_num_seqs == 256
    with pytest.raises(UserError, match=r"unknown GPU 'H201' \(did you mean H200"):
        load_scenario(DEFAULT, _cluster(gpu="H201"))
    # A GPU the model's by_gpu names is accepted (a custom part with its own profile fields).
    sc = load_scenario(DEFAULT, {**_cluster(gpu="X9"),
                                 "models": {"llama-3.1-8b": {"by_gpu": {"X9": {"base_s": 0.01}}}}})
    assert sc.profile("llama-3.1-8b", "X9").base_s == 0.01


def test_flags_of_a_command_line():
    assert flags_from_command("vllm serve m --max-num-seqs 256 --max-model-len=8192 --no-enable-prefix-caching") \
        == {"max_num_seqs": 256, "max_model_len": 8192, "enable_prefix_caching": False}


def test_resolved_engines_are_in_the_dump():
    dump = load_scenario(DEFAULT).dump()
    eng = dump["resolved_engines"][0]
    assert eng["flags"]["max_num_seqs"] == 1024 and eng["profile_measured_with"]["max_num_seqs"] == 256
    assert dump["resolved_profiles"]["llama-3.1-8b"]["max_num_seqs"] == 1024
