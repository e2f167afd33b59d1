"""GPU types a scenario may name, and vLLM's engine defaults on each.

vLLM picks some engine defaults by device when the flag is not given (`EngineArgs.get_batch_defaults`
in `vllm/engine/arg_utils.py`): on a GPU with at least 70 GiB of memory that is not an A100 (H100, H200,
B200, MI300X, ...) the OpenAI server runs with `--max-num-seqs 1024 --max-num-batched-tokens 8192`; on
smaller GPUs and on the A100, `256` and `2048`. Prefix caching is on by default (V1), KV blocks hold 16
tokens and one API server process takes the requests. A simulated engine gets these unless the scenario
(`cluster.instances[].engine`) or the profile says otherwise (`qlmctl.scenario.Scenario.engine_flags`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

GPU_MEMORY_GIB: dict[str, float] = {
    # NVIDIA data-centre GPUs
    "H200": 141, "H100": 80, "H100-NVL": 94, "H800": 80, "H20": 96, "GH200": 96,
    "B200": 180, "B300": 270, "GB200": 186, "GB300": 279,
    "A100": 80, "A100-40GB": 40, "A800": 80, "A40": 48, "A30": 24, "A10": 24, "A10G": 24,
    "L40S": 48, "L40": 48, "L20": 48, "L4": 24, "T4": 16, "V100": 32,
    "RTX-PRO-6000": 96, "RTX-6000-ADA": 48, "RTX-4090": 24, "RTX-5090": 32,
    # AMD Instinct
    "MI300X": 192, "MI325X": 256, "MI355X": 288, "MI300A": 128, "MI250X": 64, "MI210": 64,
}
"""Memory of one device, GiB (as the device reports it, rounded): what vLLM's defaults look at."""

LARGE_GPU_GIB = 70.0
"""vLLM's threshold for its larger defaults (`device_memory >= 70 * GiB_bytes and "a100" not in name`)."""

ENGINE_FLAGS: tuple[str, ...] = (
    "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "enable_prefix_caching",
    "api_server_count",
)
"""The engine flags the simulator models, as vLLM names them (`--max-num-seqs` ...), in display order."""


def canonical_gpu(name: str) -> str | None:
    """The table's spelling of a GPU type (case and `_`/` `/`-` insensitive), None when unknown."""
    key = name.strip().upper().replace("_", "-").replace(" ", "-")
    key = key.removeprefix("NVIDIA-").removeprefix("AMD-").removeprefix("INSTINCT-")
    for known in GPU_MEMORY_GIB:
        if known.upper() == key:
            return known
    return None


def unknown_gpu_message(name: str, also: Iterable[str] = ()) -> str:
    """`unknown GPU 'x'; known: ...` with a close match suggested."""
    extra = [g for g in also if canonical_gpu(g) is None]
    names = [*GPU_MEMORY_GIB, *extra]
    close = difflib.get_close_matches(name.upper(), [n.upper() for n in names], n=2, cutoff=0.7)
    hint = ""
    if close:
        picks = sorted((next(n for n in names if n.upper() == c) for c in close), key=lambda n: (len(n) != len(name), n))
        hint = f" (did you mean {' or '.join(picks)}?)"
    return (f"unknown GPU '{name}'{hint}; known: {', '.join(names)}. A GPU named in a model's by_gpu is "
            f"accepted too")


def vllm_defaults(gpu: str | None) -> dict[str, Any]:
    """vLLM's defaults for the flags of `ENGINE_FLAGS` on `gpu` (the OpenAI server; `max_model_len` has none
    here: vLLM takes it from the model's config, which a profile states)."""
    canon = canonical_gpu(gpu) if gpu else None
    memory = GPU_MEMORY_GIB.get(canon or "", 0.0)
    large = memory >= LARGE_GPU_GIB and "A100" not in (canon or "")
    return {
        "max_num_seqs": 1024 if large else 256,
        "max_num_batched_tokens": 8192 if large else 2048,
        "block_size": 16,
        "enable_prefix_caching": True,
        "api_server_count": 1,
    }


def describe_flags(flags: dict[str, Any]) -> str:
    """`max_num_seqs 1024, prefix caching off, ...`: flags in `ENGINE_FLAGS` order (unknown ones last)."""
    parts = []
    for k in [*ENGINE_FLAGS, *(k for k in flags if k not in ENGINE_FLAGS)]:
        if k not in flags or flags[k] is None:
            continue
        v = flags[k]
        if k == "enable_prefix_caching":
            parts.append(f"prefix caching {'on' if v else 'off'}")
        else:
            parts.append(f"{k} {v}")
    return ", ".join(parts)
