"""Automatic prefix caching, as vLLM V1 does it, at the granularity a workload knows its prompts' content.

vLLM hashes each full KV block of a prompt (block_size tokens), chained from the start (a block's hash covers
everything before it too), and keeps computed blocks cached after their request is done, in the pool of free
blocks, until an allocation needs them (least recently used first). A new request reuses the longest prefix
of its blocks still cached: those tokens are not prefilled again (its computed tokens start at the hit; at
least its last prompt token is always computed).

Here a prompt's known content is a `PromptBlocks`: a chain of hashes, each standing for `block_tokens` tokens
(a trace's blocks: Mooncake's `hash_ids`, 512 tokens each; a shared system prompt; or vLLM's own 16-token
blocks, as the emulator hashes the prompts it receives). A `PrefixCache` per engine keeps those blocks LRU,
bounded by the engine's free KV blocks. What it leaves out: the KV blocks a cache hit shares with running
sequences still count once per sequence (the engine charges every sequence its whole context), and output
tokens are never cached (a trace names no output content).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from simulator.profile import by_constructor


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """The leading blocks of a prompt whose content is known: `hashes[i]` stands for tokens
    [i * block_tokens, (i + 1) * block_tokens) together with all before them (two prompts share block i only
    if they share hashes[0..i]); the prompt may go on beyond them."""

    block_tokens: int
    hashes: tuple[int, ...]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return by_constructor(self)


class PrefixCache:
    """One engine's cached prompt blocks, least recently used first."""

    __slots__ = ("kv_block_size", "_blocks", "blocks")

    def __init__(self, kv_block_size: int) -> None:
        self.kv_block_size = kv_block_size
        self._blocks: OrderedDict[tuple[int, int], int] = OrderedDict()  # (block_tokens, hash) -> KV blocks
        self.blocks = 0
        """KV blocks the cached content would take."""

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, prefix: PromptBlocks, tokens: int) -> int:
        """Tokens of a sequence of `tokens` tokens (prompt and any output it recomputes) whose KV is cached:
        its longest prefix of cached blocks (each touched), at most `tokens - 1`, in whole KV blocks."""
        bt = prefix.block_tokens
        cache = self._blocks
        hit = 0
        for h in prefix.hashes:
            key = (bt, h)
            if key not in cache:
                break
            cache.move_to_end(key)
            hit += bt
        if not hit:
            return 0
        bs = self.kv_block_size
        return min(hit, tokens - 1) // bs * bs

    def insert(self, prefix: PromptBlocks, tokens: int, capacity: int) -> None:
        """Cache the blocks of a sequence whose `tokens` prompt tokens are computed (a last block it fills only
        partly too: its hash is its own), then keep within `capacity` KV blocks."""
        bt = prefix.block_tokens
        bs = self.kv_block_size
        cache = self._blocks
        for i, h in enumerate(prefix.hashes):
            start = i * bt
            if start >= tokens:
                break
            key = (bt, h)
            if key in cache:
                cache.move_to_end(key)
            else:
                n = -(-min(bt, tokens - start) // bs)
                cache[key] = n
                self.blocks += n
        self.shrink(capacity)

    def shrink(self, capacity: int) -> None:
        """Evict least recently used blocks until the cache takes at most `capacity` KV blocks."""
        cache = self._blocks
        while self.blocks > capacity and cache:
            _, n = cache.popitem(last=False)
            self.blocks -= n
