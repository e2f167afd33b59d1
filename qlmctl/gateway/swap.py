"""Model swaps by sleep mode: the default `SwapControl` (restart swaps are the launcher's)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from qlmctl.engines.base import EngineError

if TYPE_CHECKING:
    from qlmctl.gateway.instance import LiveEngine

SLEEP_RETRIES = 100
"""Attempts at sleep while the engine still holds aborted requests (409), 50 ms apart."""


class SleepModeControl:
    """Swap by the engines' sleep mode: sleep (level 1) the awake engine, wake up the target.

    Every engine of the instance runs (vLLM: with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1).
    """

    warm = True

    async def release(self, engine: LiveEngine) -> None:
        # vLLM must hold no requests to sleep; those the gateway aborted may linger for a step or two
        # (the emulator answers 409 meanwhile).
        for attempt in range(SLEEP_RETRIES):
            try:
                await engine.server.sleep(level=1)
                break
            except EngineError as e:
                if e.status != 409 or attempt == SLEEP_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05)
        engine.sleeping = True

    async def acquire(self, engine: LiveEngine) -> None:
        await engine.server.wake_up()
        engine.sleeping = False

    def available(self, engine: LiveEngine) -> bool:
        return True
