"""Which request body fields the gateway forwards to its engines.

The fields of vLLM's OpenAI-compatible `CompletionRequest` and `ChatCompletionRequest`
(`vllm/entrypoints/openai/{completion,chat_completion}/protocol.py`, and the older releases'
`vllm/entrypoints/openai/protocol.py`: `guided_*`, `best_of`, `logits_processors`), plus what the
scenario adds (`live.forward_fields`). Anything else is dropped, and the answer names what was dropped in
its `x-qlm-ignored-fields` header.

Why drop rather than refuse (the OpenAI API answers 400 to an unknown parameter): the gateway stands in
for vLLM, and vLLM accepts unknown fields, ignores them and logs a warning; clients written against vLLM
(or sending another provider's extras through the OpenAI SDK's `extra_body`) keep working. Why not
forward them as vLLM would receive them: an engine has no use for them, and a field of any size would
otherwise travel to every engine a request is tried on.

The gateway owns some of vLLM's fields: `stream` and `stream_options` (it always streams from the
engine), `priority` (its scheduler orders requests; a client's own would jump the engine's queue) and
`request_id` (a retried or resumed request is sent again, and an engine may still hold the attempt it
aborted under that id). `priority` and `request_id` are dropped like unknown fields unless listed in
`live.forward_fields`. The SLO fields (`slo_class`, `slo_ttft_s`) are the gateway's and never forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_COMMON = frozenset({
    # OpenAI
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed", "stop",
    "stream", "stream_options", "temperature", "top_p", "user", "response_format",
    # vLLM sampling parameters
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "allowed_token_ids", "prompt_logprobs", "logprob_token_ids",
    "bad_words", "thinking_token_budget",
    # vLLM extra parameters
    "add_special_tokens", "structured_outputs", "session_id", "return_tokens_as_token_ids", "return_token_ids",
    "routed_experts_prompt_start", "return_token_offsets", "return_mm_kwargs", "cache_salt", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "repetition_detection", "stream_interval", "echo",
    # older vLLM releases
    "best_of", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structural_tag", "logits_processors",
})
COMPLETION_FIELDS = _COMMON | {"prompt", "suffix", "prompt_embeds"}
"""vLLM's /v1/completions request fields."""
CHAT_FIELDS = _COMMON | {
    "messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "reasoning_effort",
    "include_reasoning", "parallel_tool_calls", "add_generation_prompt", "continue_final_message", "documents",
    "chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text",
}
"""vLLM's /v1/chat/completions request fields."""
GATEWAY_FIELDS = frozenset({"slo_class", "slo_ttft_s"})
"""Fields the gateway reads and engines never see."""
OWNED_FIELDS = frozenset({"priority", "request_id"})
"""vLLM fields the gateway does not forward unless the scenario says so (see the module docstring)."""

MAX_NAMED = 10
"""At most this many dropped field names go in the response header."""


class FieldFilter:
    """Drops the fields engines do not take from a client's body."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        extra = frozenset(extra)
        self._allowed = {"completions": (COMPLETION_FIELDS | extra) - GATEWAY_FIELDS,
                         "chat": (CHAT_FIELDS | extra) - GATEWAY_FIELDS}

    def apply(self, api: str, body: dict[str, Any]) -> list[str]:
        """Remove from `body` (in place) what is not forwarded; returns the dropped names, the gateway's own
        SLO fields aside."""
        allowed = self._allowed[api]
        dropped = [k for k in body if k not in allowed]
        if not dropped:
            return []
        for k in dropped:
            del body[k]
        return [k for k in dropped if k not in GATEWAY_FIELDS]


def ignored_header(names: list[str]) -> tuple[bytes, bytes]:
    """The `x-qlm-ignored-fields` response header naming dropped fields (printable, cut short)."""
    shown = []
    for name in names[:MAX_NAMED]:
        clean = "".join(c if c.isascii() and (c.isalnum() or c in "_-.") else "?" for c in str(name)[:40])
        shown.append(clean or '""')
    if len(names) > MAX_NAMED:
        shown.append(f"... ({len(names)} in all)")
    return b"x-qlm-ignored-fields", ", ".join(shown).encode("ascii")
