"""Prompt tokens as the gateway estimates them before an engine has counted, in bounded time.

The estimate is one token per whitespace-separated word (exact for qlmctl's synthetic prompts and the
emulator's tokenizer; about 25 % low for English text under a real tokenizer), and at least one token
per `MAX_CHARS_PER_TOKEN` characters (a tokenizer's longest tokens are a few dozen characters: a prompt
of one million-character "word" is not one token). The engine's own count replaces it in the answer.

Counting runs on the gateway's event loop, so its cost is bounded per request: a text whose length alone
puts it over the model's context is answered at once (no counting), counting stops as soon as the
count reaches the limit, and a long text is counted in slices with a turn of the event loop between
them, so that other streams never wait more than one slice (~0.3 ms) for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

MAX_CHARS_PER_TOKEN = 32
"""No token is longer than this many characters (for the lower bound of a prompt's tokens)."""
SLICE_CHARS = 1 << 16
"""Characters counted between two turns of the event loop."""


def estimate_tokens(text: str) -> int:
    """Prompt tokens of a short `text` (one per word, at least one per MAX_CHARS_PER_TOKEN characters)."""
    return max(len(text.split()), len(text) // MAX_CHARS_PER_TOKEN)


async def count_tokens(text: str, limit: int) -> int:
    """`estimate_tokens(text)`, or any number >= `limit` once it is clear the count reaches it.

    Costs at most about `limit` words of counting, in slices that yield to the event loop.
    """
    n = len(text)
    floor = n // MAX_CHARS_PER_TOKEN
    if floor >= limit:
        return floor
    if n <= SLICE_CHARS:
        return max(len(text.split()), floor)
    words = 0
    prev_space = True
    for start in range(0, n, SLICE_CHARS):
        piece = text[start:start + SLICE_CHARS]
        k = len(piece.split())
        if k and not prev_space and not piece[0].isspace():
            k -= 1  # a word cut by the slice boundary was counted in the slice before
        words += k
        prev_space = piece[-1].isspace()
        if words >= limit:
            return words
        await asyncio.sleep(0)
    return max(words, floor)


async def count_content(content: Any, limit: int) -> int:
    """Tokens of a chat message's content (a string or a list of text parts), bounded like `count_tokens`."""
    if isinstance(content, str):
        return await count_tokens(content, limit)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text", "")
                if isinstance(text, str):
                    total += await count_tokens(text, max(1, limit - total))
                    if total >= limit:
                        break
    return total
