"""The slice of vLLM's OpenAI-compatible wire format that the emulator speaks.

Parsing of /v1/completions and /v1/chat/completions bodies, the synthetic tokenizer, and the response
and server-sent-event bodies. Pure functions and small records: no I/O, no clock. Shapes, defaults and
error texts follow vLLM 0.24.0 as recorded against a real server with our synthetic-tokenizer model.

Synthetic tokenizer (our real-vLLM test model: token id i is the word `w<i>`, Llama 3 special tokens):
- a string prompt is one token per whitespace-separated word plus the <|begin_of_text|> token that the
  tokenizer prepends (so "w1 w2 w3" is 4 prompt tokens, as real vLLM reports);
- a list-of-ints prompt is one token per int (no BOS added, as vLLM);
- a chat request goes through the model's Llama 3 chat template: BOS, then per message
  <|start_header_id|> role <|end_header_id|> words... <|eot_id|>, then the assistant header
  (3 tokens): 4 + sum(4 + words) tokens.
Output token j of a request with P prompt tokens is the text ` w<(P + j) mod VOCAB_SIZE>`; so a prompt
`w1 .. wk` continues with ` w<k+1>` and a request re-submitted with its output appended continues alike.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

VOCAB_SIZE = 128256
"""Token ids wrap at Llama 3's vocabulary size."""
BOS_ID = 128000
UNK_ID = 128002

VLLM_API_VERSION = "0.24.0"
"""The vLLM release whose HTTP API this emulator follows (reported by GET /version)."""
SYSTEM_FINGERPRINT = f"vllm-{VLLM_API_VERSION}-emulator"

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""vLLM's (and OpenAI's) default `max_tokens` for /v1/completions."""

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

FinishReason = Literal["length", "abort"]

MAX_LOGPROBS = 20
"""vLLM's default --max-logprobs: the most top logprobs a request may ask for."""


class ApiError(Exception):
    """An error answered as an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(self.status, "APIError"),
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(slots=True)
class GenRequest:
    """A validated generation request, as the emulator needs it."""

    kind: Literal["completion", "chat"]
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    priority: int
    request_id: str
    created: int
    prompt: Any = None
    """A completions request's prompt as sent (text or token ids), for the prefix cache; None for chat."""
    logprobs: int | None = None
    """Top logprobs per token to return (completions' `logprobs`, chat's `top_logprobs` with `logprobs`); None:
    no logprobs."""
    tool: str | None = None
    """The function the answer calls (chat with `tools` and a `tool_choice` other than "none"); its arguments
    are the output tokens, as `{"text": "<tokens>"}`."""
    prompt_ids: list[int] | None = None
    """The prompt's token ids, when the request asked for them (vLLM's `return_token_ids`): the answer then
    carries `prompt_token_ids` (in a stream's first chunk) and each chunk's `token_ids`."""


def token_logprob(token_id: int) -> float:
    """The emulated log-probability of output token id `token_id` (a fixed function of it)."""
    return -0.1 * (1 + token_id % 5)


def _logprob_alternatives(prompt_tokens: int, j: int, k: int) -> list[tuple[str, float]]:
    """The `k` top tokens at output position `j`: the sampled one first, then others less likely."""
    tid = (prompt_tokens + j) % VOCAB_SIZE
    lp = token_logprob(tid)
    out = [(token_text(prompt_tokens, j), lp)]
    for i in range(1, k):
        out.append((f" w{(tid + i) % VOCAB_SIZE}", lp - i))
    return out


def completion_logprobs(prompt_tokens: int, start: int, end: int, k: int, offset: int) -> dict[str, Any]:
    """vLLM's completion `logprobs` for output tokens start..end-1 (text offsets from `offset`)."""
    tokens, lps, tops, offsets = [], [], [], []
    for j in range(start, end):
        alts = _logprob_alternatives(prompt_tokens, j, max(1, k))
        tokens.append(alts[0][0])
        lps.append(alts[0][1])
        tops.append(dict(alts))
        offsets.append(offset)
        offset += len(alts[0][0])
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(prompt_tokens: int, start: int, end: int, k: int) -> dict[str, Any]:
    """vLLM's chat `logprobs` ({"content": [...]}) for output tokens start..end-1."""
    content = []
    for j in range(start, end):
        alts = _logprob_alternatives(prompt_tokens, j, max(1, k))
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alts[:k]]
        t, lp = alts[0]
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": top})
    return {"content": content}


TOOL_ARGS_HEAD = '{"text": "'
TOOL_ARGS_TAIL = '"}'


def tool_arguments(prompt_tokens: int, start: int, end: int, total: int) -> str:
    """The arguments text of output tokens start..end-1 of a tool call of `total` tokens."""
    head = TOOL_ARGS_HEAD if start == 0 else ""
    tail = TOOL_ARGS_TAIL if end == total else ""
    return head + "".join(token_text(prompt_tokens, j) for j in range(start, end)) + tail


def tool_call_id(request_id: str) -> str:
    return f"chatcmpl-tool-{request_id.rsplit('-', 1)[-1]}"

def token_text(prompt_tokens: int, j: int) -> str:
    """Text of output token `j` (0-based) of a request with `prompt_tokens` prompt tokens."""
    return f" w{(prompt_tokens + j) % VOCAB_SIZE}"


def output_token_id(prompt_tokens: int, j: int) -> int:
    """Token id of output token `j` (its text is `token_text(prompt_tokens, j)`)."""
    return (prompt_tokens + j) % VOCAB_SIZE


def output_text(prompt_tokens: int, n: int) -> str:
    return "".join(token_text(prompt_tokens, j) for j in range(n))


def token_ids(text: str) -> list[int]:
    """Token ids of a string prompt as vLLM's /tokenize reports them: BOS, then `w<i>` -> i, else UNK."""
    ids = [BOS_ID]
    for word in text.split():
        ok = word[:1] == "w" and word[1:].isdigit() and int(word[1:]) < BOS_ID
        ids.append(int(word[1:]) if ok else UNK_ID)
    return ids


def count_prompt(prompt: Any) -> tuple[int, bool]:
    """(prompt tokens, whether it was text) of a completions `prompt`: a string, ints, or a batch of one."""
    if isinstance(prompt, str):
        words = len(prompt.split())
        return (words + 1 if words else 0), True
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            return len(prompt), False
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return count_prompt(prompt[0])
        if len(prompt) > 1 and all(isinstance(x, (str, list)) for x in prompt):
            raise ApiError(400, "The emulator serves one prompt per request; batched prompts are not supported.",
                           "prompt")
        if not prompt:
            return 0, False
    raise ApiError(400, "prompt must be a string, a list of token ids, or a list holding one of those.", "prompt")


HEADER_START_ID, HEADER_END_ID, EOT_ID = 128006, 128007, 128009
"""Llama 3's <|start_header_id|>, <|end_header_id|>, <|eot_id|>."""


def chat_prompt_ids(messages: Any) -> list[int]:
    """Token ids of a chat prompt under the test model's Llama 3 template, as many as `chat_prompt_tokens`
    counts: BOS, per message a header (start, role, end), its words and <|eot_id|>, then the assistant header."""
    ids = [BOS_ID]
    for m in messages:
        content = m.get("content")
        parts = [content] if isinstance(content, str) else [
            p["text"] for p in content or () if isinstance(p, dict) and isinstance(p.get("text"), str)]
        ids += [HEADER_START_ID, UNK_ID, HEADER_END_ID]
        for text in parts:
            ids += token_ids(text)[1:]
        ids.append(EOT_ID)
    return ids + [HEADER_START_ID, UNK_ID, HEADER_END_ID]


def prompt_ids_of(prompt: Any) -> list[int]:
    """Token ids of a completions prompt already counted by `count_prompt` (text: with its BOS)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    return token_ids(prompt) if isinstance(prompt, str) else list(prompt)


def chat_prompt_tokens(messages: Any) -> int:
    """Prompt tokens of a chat request under the test model's Llama 3 chat template."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list.", "messages")
    tokens = 1 + 3  # BOS; the assistant header of the generation prompt
    for m in messages:
        if not isinstance(m, dict):
            raise ApiError(400, "each message must be an object.", "messages")
        content = m.get("content")
        tokens += 4  # <|start_header_id|> role <|end_header_id|> ... <|eot_id|>
        if isinstance(content, str):
            tokens += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    tokens += len(part["text"].split())
        elif content is not None:
            raise ApiError(400, "message content must be a string or a list of parts.", "messages")
    return tokens


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise ApiError(400, f"{name} must be an integer.", name)
    return v


def _too_long(max_model_len: int, prompt_tokens: int, max_tokens: int, text: bool) -> ApiError:
    # vLLM tokenizes text prompts only up to what could fit, hence "at least" for them.
    if text and max_tokens < max_model_len:
        p = max_model_len - max_tokens + 1
        contains, total = f"at least {p}", f"at least {max_model_len + 1}"
    else:
        p = prompt_tokens
        contains, total = str(p), str(p + max_tokens)
    return ApiError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {max_tokens} "
        f"output tokens and your prompt contains {contains} input tokens, for a total of {total} tokens. "
        f"Please reduce the length of the input prompt or the number of requested output tokens. "
        f"(parameter=input_tokens, value={p})",
        "input_tokens",
    )


def parse_request(
    body: Any,
    kind: Literal["completion", "chat"],
    served_model: str,
    max_model_len: int,
    request_id: str | None = None,
) -> GenRequest:
    """Validate a request body the way vLLM does for the fields the emulator uses.

    Sampling fields (temperature, top_p, stop, ignore_eos, ...) are accepted and ignored: the emulator
    has no end-of-sequence token, so every request generates exactly `max_tokens` tokens.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model") or served_model
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    text = True
    if kind == "completion":
        if "prompt" not in body:
            raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        prompt_tokens, text = count_prompt(body["prompt"])
    else:
        prompt_tokens = chat_prompt_tokens(body.get("messages"))
    if prompt_tokens == 0:
        raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    n = _int_field(body, "n", 1)
    if n != 1:
        raise ApiError(400, "The emulator supports n=1 only.", "n")
    if kind == "chat":
        max_tokens = _int_field(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", None)
        if max_tokens is None:
            max_tokens = max(1, max_model_len - prompt_tokens)  # vLLM's chat default: fill the context
    else:
        max_tokens = _int_field(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}. "
                            f"(parameter=max_tokens, value={max_tokens})", "max_tokens")
    if prompt_tokens + max_tokens > max_model_len:
        raise _too_long(max_model_len, prompt_tokens, max_tokens, text)
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options")
    if opts is not None and not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object.", "stream_options")
    opts = opts or {}
    priority = _int_field(body, "priority", 0) or 0
    logprobs, tool = _logprobs_field(body, kind), _tool_field(body, kind)
    want_ids = body.get("return_token_ids")
    if want_ids is not None and not isinstance(want_ids, bool):
        raise ApiError(400, "return_token_ids must be a boolean.", "return_token_ids")
    prompt_ids = None
    if want_ids:
        prompt_ids = prompt_ids_of(body["prompt"]) if kind == "completion" else chat_prompt_ids(body["messages"])
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    rid = f"{prefix}-{request_id or uuid.uuid4().hex[:16]}"
    return GenRequest(
        kind=kind,
        model=served_model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        continuous_usage=bool(opts.get("continuous_usage_stats", False)),
        priority=priority,
        request_id=rid,
        created=int(time.time()),
        prompt=body["prompt"] if kind == "completion" else None,
        logprobs=logprobs,
        tool=tool,
        prompt_ids=prompt_ids,
    )


def _logprobs_field(body: dict[str, Any], kind: str) -> int | None:
    if kind == "completion":
        k = _int_field(body, "logprobs", None)
        if k is None:
            return None
        if k < 0 or k > MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {k}.", "logprobs")
        return k
    on = body.get("logprobs", False)
    k = _int_field(body, "top_logprobs", None)
    if not isinstance(on, bool) and on is not None:
        raise ApiError(400, "logprobs must be a boolean.", "logprobs")
    if k is not None and (k < 0 or k > MAX_LOGPROBS):
        raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}.", "top_logprobs")
    if k and not on:
        raise ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    return (k or 0) if on else None


def _tool_field(body: dict[str, Any], kind: str) -> str | None:
    tools = body.get("tools")
    if kind != "chat" or not tools:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}.", "tools")
    names = [t["function"]["name"] for t in tools]
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if choice in ("auto", "required", None):
        return names[0]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ApiError(400, f"Tool '{name}' has not been passed in `tools`.", "tool_choice")
        return name
    raise ApiError(400, "tool_choice must be none, auto, required or a named function.", "tool_choice")


def make_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class StreamFormatter:
    """Server-sent events of one streaming request, built from precomputed fragments (hot path)."""

    def __init__(self, req: GenRequest) -> None:
        self.req = req
        obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
        self._head = (
            f'data: {{"id":{_dumps(req.request_id)},"object":"{obj}","created":{req.created},'
            f'"model":{_dumps(req.model)},"choices":'
        )

    def _chunk(self, choice: str, usage_obj: dict[str, int] | None, last: bool = False) -> str:
        tail = f',"usage":{_dumps(usage_obj)}' if usage_obj is not None else ""
        if last:
            tail += f',"system_fingerprint":"{SYSTEM_FINGERPRINT}"'
        return f"{self._head}[{choice}]{tail}}}\n\n"

    def role(self) -> str:
        """The chat stream's opening chunk (vLLM sends the role first, with empty content)."""
        choice = '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
        ids = _dumps(self.req.prompt_ids)
        return self._chunk(choice, self._cont_usage(0))[:-3] + f',"prompt_token_ids":{ids},"prompt_text":null}}\n\n'

    def token(self, text: str, finish: FinishReason | None, generated: int, j: int | None = None) -> str:
        """One output token (output position `j`); `finish` ("length" or "abort") marks the last one, as vLLM
        does."""
        req = self.req
        if j is not None and (req.logprobs is not None or req.tool is not None or req.prompt_ids is not None):
            return self._rich_token(text, finish, generated, j)
        fr = f'"{finish}"' if finish else "null"
        if self.req.kind == "completion":
            choice = (f'{{"index":0,"text":"{text}","logprobs":null,"finish_reason":{fr},"stop_reason":null,'
                      f'"prompt_token_ids":null,"token_ids":null}}')
        else:
            choice = (f'{{"index":0,"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":{fr}'
                      + (',"stop_reason":null' if finish else "") + ',"token_ids":null}')
        return self._chunk(choice, self._cont_usage(generated), last=finish is not None)

    def _rich_token(self, text: str, finish: FinishReason | None, generated: int, j: int) -> str:
        """A token chunk with logprobs, a tool call's arguments or token ids (built as a dict: not the hot path)."""
        req = self.req
        P = req.prompt_tokens
        choice: dict[str, Any] = {"index": 0}
        ids = [output_token_id(P, j)] if req.prompt_ids is not None else None
        if req.kind == "completion":
            choice["text"] = text
            choice["logprobs"] = (completion_logprobs(P, j, j + 1, req.logprobs, len(output_text(P, j)))
                                  if req.logprobs is not None else None)
            # vLLM sends the prompt's ids once, in the first chunk.
            choice.update(finish_reason=finish, stop_reason=None,
                          prompt_token_ids=req.prompt_ids if ids is not None and j == 0 else None, token_ids=ids)
        else:
            if req.tool is not None:
                call: dict[str, Any] = {"index": 0, "function": {
                    "arguments": tool_arguments(P, j, j + 1, req.max_tokens)}}
                if j == 0:
                    call.update(id=tool_call_id(req.request_id), type="function")
                    call["function"] = {"name": req.tool, **call["function"]}
                choice["delta"] = {"tool_calls": [call]}
            else:
                choice["delta"] = {"content": text}
            choice["logprobs"] = chat_logprobs(P, j, j + 1, req.logprobs) if req.logprobs is not None else None
            fr = finish
            if req.tool is not None and finish == "length" and generated == req.max_tokens:
                fr = "tool_calls"  # the call is complete
            choice["finish_reason"] = fr
            if finish:
                choice["stop_reason"] = None
            choice["token_ids"] = ids
        return self._chunk(_dumps(choice), self._cont_usage(generated), last=finish is not None)

    def usage(self, generated: int) -> str:
        """The final usage chunk (stream_options.include_usage): no choices, only usage."""
        u = _dumps(make_usage(self.req.prompt_tokens, generated))
        return f'{self._head}[],"usage":{u},"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}\n\n'

    def error(self, err: ApiError) -> str:
        return f"data: {_dumps(err.body())}\n\n"

    def _cont_usage(self, generated: int) -> dict[str, int] | None:
        if self.req.continuous_usage:
            return make_usage(self.req.prompt_tokens, generated)
        return None


DONE_EVENT = "data: [DONE]\n\n"


def full_response(req: GenRequest, generated: int, finish: FinishReason) -> dict[str, Any]:
    """The non-streaming response body for a request that produced `generated` tokens."""
    text = output_text(req.prompt_tokens, generated)
    P = req.prompt_tokens
    ids = [output_token_id(P, j) for j in range(generated)] if req.prompt_ids is not None else None
    if req.kind == "completion":
        lp = completion_logprobs(P, 0, generated, req.logprobs, 0) if req.logprobs is not None else None
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish,
                                  "stop_reason": None, "token_ids": ids, "prompt_logprobs": None,
                                  "prompt_token_ids": req.prompt_ids, "routed_experts": None}
        obj = "text_completion"
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                   "audio": None, "function_call": None, "reasoning": None}
        if req.tool is not None:
            message["content"] = None
            message["tool_calls"] = [{"id": tool_call_id(req.request_id), "type": "function", "function": {
                "name": req.tool, "arguments": tool_arguments(P, 0, generated, req.max_tokens)}}]
            if finish == "length" and generated == req.max_tokens:
                finish = "tool_calls"  # type: ignore[assignment]
        lp = chat_logprobs(P, 0, generated, req.logprobs) if req.logprobs is not None else None
        choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish, "stop_reason": None,
                  "token_ids": ids, "routed_experts": None}
        obj = "chat.completion"
    usage: dict[str, Any] = dict(make_usage(req.prompt_tokens, generated), prompt_tokens_details=None)
    out = {
        "id": req.request_id,
        "object": obj,
        "created": req.created,
        "model": req.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage,
    }
    if req.kind == "chat":
        out.update(prompt_logprobs=None, prompt_token_ids=req.prompt_ids, prompt_text=None)
    out["kv_transfer_params"] = None
    return out
