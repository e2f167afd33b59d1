"""Helpers every policy shares: the room an instance has for new requests, within one schedule() call."""

from __future__ import annotations

from dataclasses import dataclass

from qlmctl.core.cluster import InstanceView
from qlmctl.core.request import Request


@dataclass(slots=True)
class Room:
    """Batch slots and KV blocks an instance can still take now; decremented as a policy dispatches."""

    inst: InstanceView
    slots: int
    blocks: int
    load: int
    block_size: int

    def blocks_for(self, r: Request) -> int:
        return -(-(r.prompt_tokens + r.generated_tokens + 1) // self.block_size)

    def fits(self, r: Request) -> bool:
        if self.slots <= 0:
            return False
        # An empty engine takes anything that fits at all (it may need to preempt later, as vLLM would).
        return self.blocks >= self.blocks_for(r) or self.load == 0

    def take(self, r: Request) -> None:
        self.slots -= 1
        self.blocks -= self.blocks_for(r)
        self.load += 1


def room_of(inst: InstanceView, dispatch_limit: int) -> Room | None:
    """The room on `inst`, or None when it serves nothing now (swapping, unhealthy, no model)."""
    prof = inst.profile
    if inst.swapping or not inst.healthy or prof is None:
        return None
    load = inst.num_running + inst.num_waiting
    return Room(inst, prof.max_num_seqs + dispatch_limit - load, inst.free_kv_blocks, load, prof.block_size)
