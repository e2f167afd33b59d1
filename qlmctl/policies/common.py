"""Helpers every policy shares: the room an instance has for new requests, within one schedule() call."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlmctl.core.cluster import ClusterView, InstanceView
from qlmctl.core.request import Request
from simulator.profile import EngineProfile, admission_blocks


@dataclass(slots=True)
class Room:
    """Batch slots, KV blocks and (for a pulling policy) prefill tokens an instance can still take now;
    decremented as a policy dispatches."""

    inst: InstanceView
    slots: int
    blocks: int
    load: int
    block_size: int
    blocked: bool = False
    """Had nothing it could take at the last look; skipped until its instance or model's queue changes."""
    taken_blocks: int = 0
    """Blocks taken by this call's dispatches, which the engine's free figure does not show yet."""
    tokens: float = math.inf
    """Prompt tokens the engine can start prefilling within the look-ahead (see `room_of`)."""
    taken_tokens: int = 0

    def blocks_for(self, r: Request) -> int:
        """KV blocks the engine needs free to admit `r` (as `simulator.engine.Engine` counts them)."""
        return admission_blocks(r.prompt_tokens + r.generated_tokens, self.block_size)

    def fits(self, r: Request) -> bool:
        if self.slots <= 0 or (self.tokens <= 0 and self.load > 0):
            return False
        # An empty engine takes anything that fits at all (it may need to preempt later, as vLLM would).
        # (`blocks_for(r)` inlined: this runs for every dispatch.)
        return self.blocks >= -(-(r.prompt_tokens + r.generated_tokens + 1) // self.block_size) or self.load == 0

    def take(self, r: Request) -> None:
        n = -(-(r.prompt_tokens + r.generated_tokens + 1) // self.block_size)  # blocks_for(r)
        self.slots -= 1
        self.blocks -= n
        self.taken_blocks += n
        self.load += 1
        if self.tokens != math.inf:
            t = r.prompt_tokens + r.generated_tokens
            self.tokens -= t
            self.taken_tokens += t


def room_of(inst: InstanceView, dispatch_limit: int, lookahead_steps: float | None = None) -> Room | None:
    """The room on `inst`, or None when it serves nothing now (swapping, unhealthy, no model).

    With `lookahead_steps`, the room also holds only the prompt tokens the engine can start within that many
    steps: each step's token budget, less a token for each running sequence, less what it already has to
    prefill. A request can always join an empty engine, or one with tokens to spare however long its prompt.
    """
    prof = inst.profile
    if inst.swapping or not inst.healthy or prof is None:
        return None
    running = inst.num_running
    load = running + inst.num_waiting
    room = Room(inst, prof.max_num_seqs + dispatch_limit - load, inst.free_kv_blocks, load, prof.block_size)
    if lookahead_steps is not None:
        room.tokens = _token_room(prof, running, inst.pending_prefill_tokens, lookahead_steps)
    return room


def token_room(inst: InstanceView, lookahead_steps: float) -> float:
    """Prompt tokens `inst` can start within `lookahead_steps` steps beyond those it already holds."""
    prof = inst.profile
    assert prof is not None
    return _token_room(prof, inst.num_running, inst.pending_prefill_tokens, lookahead_steps)


def _token_room(prof: EngineProfile, running: int, pending: int, lookahead_steps: float) -> float:
    """`token_room` from what it reads of the instance (`room_of` has read its running count already)."""
    budget = prof.max_num_batched_tokens
    per_step = max(budget - running, budget / 4)
    return lookahead_steps * per_step - pending


class RoomBook:
    """Every instance's room, kept current by events rather than polled on every schedule() call.

    An instance's load changes only through the policy's own dispatches (applied with `Room.take`) and
    through finishes, evictions and swaps, which the policy's hooks report with `touch`. Free KV blocks
    also shrink as running requests decode, so `fresh_blocks` re-reads them for the one instance chosen.
    So a room of the book holds its blocks and prompt tokens only once `fresh_blocks` has read them: call it
    before `Room.fits` or `Room.take` (its slots and load are current from `refresh` on).
    """

    def __init__(self, dispatch_limit: int, lookahead_steps: float | None = None) -> None:
        self.dispatch_limit = dispatch_limit
        self.lookahead_steps = lookahead_steps
        self._rooms: dict[int, Room | None] = {}
        self._stale: set[int] | None = None  # None: all
        # Kept so that a call costs what changed, not the number of instances:
        self._open: dict[int, Room] = {}  # rooms that may have a free slot (a full one drops out until refreshed)
        self._unloaded: set[int] = set()  # instances serving nothing
        self._handed: list[Room] = []  # rooms open_rooms gave out since the last refresh (only they take)

    def touch(self, instance_id: int | None) -> None:
        if instance_id is not None and self._stale is not None:
            self._stale.add(instance_id)

    def touch_all(self) -> None:
        self._stale = None

    def refresh(self, cluster: ClusterView) -> None:
        for rm in self._handed:  # the last call's dispatches are on the engines now
            rm.taken_blocks = 0
            rm.taken_tokens = 0
        self._handed = []
        insts = cluster.instances
        ids = range(len(insts)) if self._stale is None else self._stale
        rooms, open_, unloaded = self._rooms, self._open, self._unloaded
        limit = self.dispatch_limit
        for iid in ids:
            # `room_of` but for what `fresh_blocks` reads when the room is chosen (free blocks, prompt tokens).
            inst = insts[iid]
            prof = inst.profile
            if inst.swapping or not inst.healthy or prof is None:
                rm = None
            else:
                load = inst.num_running + inst.num_waiting
                rm = Room(inst, prof.max_num_seqs + limit - load, 0, load, prof.block_size)
            rooms[iid] = rm
            if rm is None:
                unloaded.add(iid)
                open_.pop(iid, None)
            else:
                unloaded.discard(iid)
                open_[iid] = rm
        self._stale = set()

    def get(self, instance_id: int) -> Room | None:
        return self._rooms.get(instance_id)

    def open_rooms(self) -> list[Room]:
        """Rooms of serving instances with a free slot that are not blocked (in no particular order)."""
        out = []
        full = None
        for iid, rm in self._open.items():
            if rm.slots > 0:
                if not rm.blocked:
                    out.append(rm)
            elif full is None:
                full = [iid]
            else:
                full.append(iid)
        if full is not None:
            for iid in full:  # a full room opens again only as a new Room, at a refresh
                del self._open[iid]
        self._handed.extend(out)
        return out

    def unblock(self, models: set[str]) -> None:
        """New requests of these models arrived: blocked rooms serving them may take them."""
        for rm in self._open.values():
            if rm.blocked and rm.inst.model in models:
                rm.blocked = False

    def rooms(self) -> list[Room]:
        """Rooms of every serving instance."""
        return [rm for rm in self._rooms.values() if rm is not None]

    def unloaded(self) -> list[int]:
        """Instances serving nothing now (no model, swapping or unhealthy), in instance order."""
        return sorted(self._unloaded) if self._unloaded else []

    def fresh_blocks(self, rm: Room) -> None:
        """Re-read what shrinks between events: free KV blocks (decoding), and prefill tokens (each step)."""
        inst = rm.inst
        rm.blocks = inst.free_kv_blocks - rm.taken_blocks
        if self.lookahead_steps is not None:
            tokens = _token_room(inst.profile, inst.num_running, inst.pending_prefill_tokens, self.lookahead_steps)
            rm.tokens = tokens - rm.taken_tokens

