"""Engine servers behind the gateway, by kind (see `qlmctl.engines.base` for the seam).

`ENGINE_KINDS` is the registry: a kind's name (a scenario's `live.engines[].kind`) and the
`module:attr` of its `EngineKind`. Adding a kind is one new module plus one line here. Modules are
imported on first use, so that checking a scenario's kind loads no HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlmctl.engines.base import EngineKind

ENGINE_KINDS: dict[str, str] = {
    "vllm": "qlmctl.engines.vllm:KIND",
}
"""Engine kind name -> "module:attr" of its `EngineKind`."""

DEFAULT_KIND = "vllm"


def engine_kind(name: str) -> EngineKind:
    """The kind `name` (its module imported now if it was not yet); KeyError for an unknown name."""
    module, _, attr = ENGINE_KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["DEFAULT_KIND", "ENGINE_KINDS", "engine_kind"]
