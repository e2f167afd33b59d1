"""Where the gateway's prompt token counts come from (`live.tokenizer`): the model's tokenizer, the engine's
POST /tokenize, or the word count.

The scheduler's prefill and KV estimates rest on a request's prompt tokens before any engine has seen it.
Sources, per model:

- `hf` (a tokenizer folder or file, or `auto` when the engine's model path is a local folder): Hugging Face
  `transformers` (the chat template applied to chat requests) or `tokenizers` (chat: the contents plus a
  Llama-3-like 4 tokens per message and 4 for the generation prompt), whichever is installed; counted in a
  worker thread, off the event loop.
- `engine`: the engine's POST /tokenize (vLLM's: chat template included); one more call per request to
  vLLM's API server, which can be the bottleneck under load (docs/live.md).
- `words`: one token per word, at least one per 32 characters (`qlmctl.gateway.tokens`); exact for the
  synthetic `w<i>` prompts, ~25 % low for English, blind to chat templates.

`auto` picks the first that works at start: hf from the engine's model folder (GET /v1/models `root`),
then engine, then words. Counts are cached (LRU on the prompt); a failed engine call counts by words.
A text whose length alone puts it over the model's context is not counted at all (the caller refuses it).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson

from qlmctl.engines.base import EngineError
from qlmctl.gateway.lograte import PER_EVENT
from qlmctl.gateway.tokens import MAX_CHARS_PER_TOKEN, count_content, count_tokens

log = logging.getLogger("qlmctl.gateway")

CACHE_ENTRIES = 4096
CACHE_MAX_KEY_CHARS = 16 << 10
"""Prompts longer than this are counted every time (so the cache holds at most ~64 Mi characters)."""
CHAT_MESSAGE_TOKENS = 4
"""Template tokens per chat message when only `tokenizers` (no chat template) is installed (Llama 3's)."""
CHAT_GENERATION_TOKENS = 4
"""Template tokens around a chat prompt (BOS and the assistant header) in that case."""


class PromptCounter(Protocol):
    """Counts a request's prompt tokens for one model."""

    source: str
    """What counts: `words`, `engine`, `hf:<path>` (for logs, the run summary and `qlm:tokenizer_info`)."""

    async def count(self, text: str, limit: int) -> int:
        """Tokens of a completion prompt; any number >= `limit` once it is clear the count reaches it."""
        ...

    async def count_chat(self, messages: list[dict[str, Any]], limit: int) -> int:
        """Tokens of a chat request's prompt (its messages, templated where the source can)."""
        ...


class WordCounter:
    """One token per word, at least one per MAX_CHARS_PER_TOKEN characters; in bounded time on the loop."""

    source = "words"

    async def count(self, text: str, limit: int) -> int:
        return await count_tokens(text, limit)

    async def count_chat(self, messages: list[dict[str, Any]], limit: int) -> int:
        total = 0
        for m in messages:
            total += await count_content(m.get("content"), max(1, limit - total))
            if total >= limit:
                break
        return total


class _CachedCounter:
    """LRU cache of counts by prompt; subclasses count a miss with `_count_text` / `_count_messages`."""

    source = "?"

    def __init__(self) -> None:
        self._cache: OrderedDict[str | bytes, int] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._words = WordCounter()

    def _get(self, key: str | bytes) -> int | None:
        n = self._cache.get(key)
        if n is not None:
            self._cache.move_to_end(key)
            self.hits += 1
        return n

    def _put(self, key: str | bytes, n: int) -> None:
        self.misses += 1
        if len(key) > CACHE_MAX_KEY_CHARS:
            return
        self._cache[key] = n
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    async def count(self, text: str, limit: int) -> int:
        floor = len(text) // MAX_CHARS_PER_TOKEN
        if floor >= limit:
            return floor  # over the context by its length alone: not worth tokenizing
        n = self._get(text)
        if n is None:
            n = await self._count_text(text, limit)
            self._put(text, n)
        return n

    async def count_chat(self, messages: list[dict[str, Any]], limit: int) -> int:
        key = orjson.dumps(messages)
        if len(key) // MAX_CHARS_PER_TOKEN >= limit:
            return len(key) // MAX_CHARS_PER_TOKEN
        n = self._get(key)
        if n is None:
            n = await self._count_messages(messages, limit)
            self._put(key, n)
        return n

    async def _count_text(self, text: str, limit: int) -> int:
        raise NotImplementedError

    async def _count_messages(self, messages: list[dict[str, Any]], limit: int) -> int:
        raise NotImplementedError


class TokenizeServer(Protocol):
    """An engine server with vLLM's POST /tokenize."""

    url: str

    async def tokenize(self, body: dict[str, Any], timeout_s: float = 2.0) -> int: ...


class EngineCounter(_CachedCounter):
    """The engine's POST /tokenize; the word count when the engine does not answer in time."""

    source = "engine"

    def __init__(self, model: str, servers: Sequence[TokenizeServer], timeout_s: float = 2.0) -> None:
        super().__init__()
        self.model = model
        self.servers = list(servers)
        self.timeout_s = timeout_s
        self.failures = 0
        self._next = 0

    async def _ask(self, body: dict[str, Any]) -> int | None:
        server = self.servers[self._next % len(self.servers)]
        self._next += 1  # spread over the model's engines
        try:
            return await server.tokenize({"model": self.model, **body}, self.timeout_s)
        except EngineError as e:
            self.failures += 1
            log.warning("prompt tokens by words: %s POST /tokenize failed: %s", server.url, e, extra=PER_EVENT)
            return None

    async def _count_text(self, text: str, limit: int) -> int:
        n = await self._ask({"prompt": text})
        return n if n is not None else await self._words.count(text, limit)

    async def _count_messages(self, messages: list[dict[str, Any]], limit: int) -> int:
        n = await self._ask({"messages": messages, "add_generation_prompt": True})
        return n if n is not None else await self._words.count_chat(messages, limit)


class HFCounter(_CachedCounter):
    """A Hugging Face tokenizer (`transformers`, else `tokenizers`), run in a worker thread."""

    def __init__(self, path: str, tokenizer: Any, kind: str) -> None:
        super().__init__()
        self.source = f"hf:{path}"
        self._tok = tokenizer
        self._kind = kind
        """`transformers` or `tokenizers`."""

    @classmethod
    def load(cls, path: str) -> HFCounter:
        """The tokenizer at `path` (a folder, a tokenizer.json, or a cached Hugging Face name); raises
        ValueError saying what is missing."""
        try:
            transformers = importlib.import_module("transformers")
        except ImportError:
            transformers = None
        if transformers is not None:
            try:
                tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                return cls(path, tok, "transformers")
            except Exception as e:  # noqa: BLE001 - any failure to load is the same answer to the user
                if Path(path).is_file():
                    pass  # a bare tokenizer.json: `tokenizers` reads it
                else:
                    raise ValueError(f"live.tokenizer: transformers cannot load a tokenizer from '{path}': {e}") \
                        from None
        try:
            tokenizers = importlib.import_module("tokenizers")
        except ImportError:
            raise ValueError(f"live.tokenizer: '{path}' needs Hugging Face `tokenizers` or `transformers` "
                             f"(pip install tokenizers); or set live.tokenizer to engine or words") from None
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"live.tokenizer: no tokenizer.json at '{path}'")
        try:
            return cls(path, tokenizers.Tokenizer.from_file(str(file)), "tokenizers")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"live.tokenizer: cannot read '{file}': {e}") from None

    def _encode(self, text: str) -> int:
        if self._kind == "transformers":
            return len(self._tok(text)["input_ids"])
        return len(self._tok.encode(text).ids)

    def _encode_chat(self, messages: list[dict[str, Any]]) -> int:
        if self._kind == "transformers" and getattr(self._tok, "chat_template", None):
            return len(self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        total = CHAT_GENERATION_TOKENS
        for m in messages:
            content = m.get("content")
            parts = [content] if isinstance(content, str) else [
                p["text"] for p in content or () if isinstance(p, dict) and isinstance(p.get("text"), str)]
            total += CHAT_MESSAGE_TOKENS + sum(self._encode_plain(t) for t in parts)
        return total

    def _encode_plain(self, text: str) -> int:
        if self._kind == "transformers":
            return len(self._tok(text, add_special_tokens=False)["input_ids"])
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    async def _count_text(self, text: str, limit: int) -> int:
        return await asyncio.to_thread(self._encode, text)

    async def _count_messages(self, messages: list[dict[str, Any]], limit: int) -> int:
        return await asyncio.to_thread(self._encode_chat, messages)


async def resolve(setting: str, model: str, servers: Sequence[Any], timeout_s: float = 2.0) -> PromptCounter:
    """The counter `setting` gives for `model` served by `servers` (checked: a source asked for by name must
    work now; raises ValueError saying why not)."""
    if setting == "words":
        return WordCounter()
    tokenizing = [s for s in servers if hasattr(s, "tokenize")]
    if setting == "engine":
        if not tokenizing:
            raise ValueError(f"live.tokenizer: engine, but no engine of model '{model}' has POST /tokenize")
        err = await _probe(tokenizing[0], model, timeout_s)
        if err is not None:
            raise ValueError(f"live.tokenizer: engine, but {tokenizing[0].url} POST /tokenize failed: {err}")
        return EngineCounter(model, tokenizing, timeout_s)
    if setting != "auto":
        return await asyncio.to_thread(HFCounter.load, str(Path(setting.replace("{model}", model)).expanduser()))
    for server in servers:  # auto: the engine's own model folder, if it is here and a tokenizer library is
        root = await _root(server, timeout_s)
        if root is not None and Path(root).is_dir():
            try:
                return await asyncio.to_thread(HFCounter.load, root)
            except ValueError as e:
                log.info("%s", e)
            break
    if tokenizing and await _probe(tokenizing[0], model, timeout_s) is None:
        return EngineCounter(model, tokenizing, timeout_s)
    return WordCounter()


async def _root(server: Any, timeout_s: float) -> str | None:
    get = getattr(server, "model_root", None)
    if get is None:
        return None
    try:
        return await get(timeout_s)
    except EngineError:
        return None


async def _probe(server: TokenizeServer, model: str, timeout_s: float) -> str | None:
    """None if the server's /tokenize counts a prompt, else why not."""
    try:
        n = await server.tokenize({"model": model, "prompt": "hello"}, timeout_s)
    except EngineError as e:
        return str(e)
    return None if n > 0 else f"it counted {n} tokens"


def counter_for(source: str, model: str, servers: Sequence[Any], timeout_s: float = 2.0) -> PromptCounter:
    """The counter of a source `resolve` picked elsewhere (a relay worker builds the core's choice with its
    own connections): `words`, `engine` or `hf:<path>`."""
    if source == "engine":
        return EngineCounter(model, [s for s in servers if hasattr(s, "tokenize")], timeout_s)
    if source.startswith("hf:"):
        return HFCounter.load(source[3:])
    return WordCounter()
