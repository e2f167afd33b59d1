"""Helpers every policy shares: the room an instance has for new requests, within one schedule() call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import Final

from qlmctl.core.cluster import ClusterView, InstanceView
from qlmctl.core.request import Request
from simulator.profile import EngineProfile, admission_blocks


@dataclass(slots=True, init=False)
class Room:
    """Batch slots, KV blocks and (for a pulling policy) prefill tokens an instance can still take now;
    decremented as a policy dispatches."""

    inst: InstanceView
    slots: int
    blocks: int
    load: int
    block_size: int
    taken_blocks: int = 0
    """Blocks taken by this call's dispatches, which the engine's free figure does not show yet."""
    tokens: float = math.inf
    """Prompt tokens the engine can start prefilling within the look-ahead (see `room_of`)."""
    taken_tokens: int = 0
    read: bool = False
    """Its blocks and tokens have been read (`RoomBook.fresh_blocks`) and its engine has not stepped since."""
    heap_key: tuple[float, int] = (math.nan, -1)
    """(free KV tokens, load) as last entered in the room book's heaps (`RoomBook.place`)."""
    iid: int = -1
    """Its instance's id (`inst.instance_id`, kept here: compiled, a read through the instance view is a lookup)."""

    # Written out: the dataclass's generated one would be interpreted code in the compiled build.
    def __init__(self, inst: InstanceView, slots: int, blocks: int, load: int, block_size: int, taken_blocks: int = 0,
                 tokens: float = math.inf, taken_tokens: int = 0, read: bool = False,
                 heap_key: tuple[float, int] = (math.nan, -1), iid: int = -1) -> None:
        self.inst = inst
        self.slots = slots
        self.blocks = blocks
        self.load = load
        self.block_size = block_size
        self.taken_blocks = taken_blocks
        self.tokens = tokens
        self.taken_tokens = taken_tokens
        self.read = read
        self.heap_key = heap_key
        self.iid = iid

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


SCAN_ROOMS: Final = 8
"""Up to this many rooms of a model, `RoomBook.place` looks at each (cheaper than keeping heaps)."""


def _kv_room(rm: Room) -> float:
    """Tokens `rm`'s free KV blocks hold (inf for an empty engine, which takes anything: `Room.fits`)."""
    return rm.blocks * rm.block_size if rm.load > 0 else math.inf


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
    room = Room(inst, prof.max_num_seqs + dispatch_limit - load, inst.free_kv_blocks, load, prof.block_size,
                iid=inst.instance_id)
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
    before `Room.fits` or `Room.take` (its slots and load are current from `refresh` on). In a world that
    reports engine steps (the simulator), what was read stays current until the next step (`stepped`), so
    `read` and `place` read only rooms whose engines moved; live, they read every room every time.
    """

    def __init__(self, dispatch_limit: int, lookahead_steps: float | None = None, *,
                 tracks_steps: bool = False, scan_rooms: int = SCAN_ROOMS) -> None:
        """`tracks_steps`: the owner calls `stepped` (or `touch`) on every `Policy.on_instance_stepped`, so where
        the world reports steps (`steps_reported`), what was read of a room stays current until then (`read`,
        `place`)."""
        self.dispatch_limit = dispatch_limit
        self.lookahead_steps = lookahead_steps
        self.tracks_steps = tracks_steps
        self.scan_rooms = scan_rooms
        self._rooms: dict[int, Room | None] = {}
        self._stale: set[int] | None = None  # None: all
        # Kept so that a call costs what changed, not the number of instances:
        self._open: dict[int, Room] = {}  # rooms that may have a free slot (a full one drops out until refreshed)
        self._ready: dict[int, Room] = {}  # the open rooms not blocked (`open_list`)
        self._blocked: dict[str, dict[int, Room]] = {}  # per model, the blocked rooms its next arrival opens
        self._starved: dict[int, Room] = {}  # blocked rooms out of prompt tokens: opened by a step (`block`)
        self._by_model: dict[str, dict[int, Room]] = {}  # `_open` by the model each serves
        self._model_of: dict[int, str] = {}  # the model each room of `_by_model` is filed under
        self._unread: dict[str, list[Room]] = {}  # open rooms refreshed since `place` last read them
        self._caps: dict[str, list[tuple[float, int, int, Room]]] = {}
        """Per model, a heap of (-free KV tokens, instance id, id(room), room) of the rooms read, for `place` (stale
        entries are dropped as they come up)."""
        self._heaped: set[str] = set()  # models whose rooms `place` keeps in `_caps` / `_loads` (many rooms)
        self._loads: dict[str, list[tuple[int, int, int, Room]]] = {}
        """Per model, a heap of (load, instance id, id(room), room) of the rooms read, for `place`."""
        self._current = False  # rooms read stay current until touched (tracks_steps and the world reports steps)
        self._cluster: ClusterView | None = None  # the cluster `_reports` was asked of
        self._reports = False  # `tracks_steps` and that cluster reports steps
        self._placing = False  # `place` has been called: `_unread` is kept from then on
        self._unloaded: set[int] = set()  # instances serving nothing
        self._handed: list[Room] = []  # rooms that took requests since the last refresh (`took`, `taken`)

    def touch(self, instance_id: int | None) -> None:
        if instance_id is not None and self._stale is not None:
            self._stale.add(instance_id)

    def touch_all(self) -> None:
        self._stale = None

    def refresh(self, cluster: ClusterView) -> None:
        handed = self._handed
        if handed:
            for took in handed:  # the last call's dispatches are on the engines now
                took.taken_blocks = 0
                took.taken_tokens = 0
            handed.clear()
        if cluster is not self._cluster:  # (asked once per cluster, not on every call)
            self._cluster = cluster
            self._reports = bool(self.tracks_steps and getattr(cluster, "steps_reported", False))
        self._current = self._reports
        stale = self._stale
        if stale is not None and not stale:
            return  # nothing touched since the last refresh (many calls)
        insts = cluster.instances
        ids = range(len(insts)) if stale is None else stale
        rooms, open_, unloaded = self._rooms, self._open, self._unloaded
        by_model, unread, model_of = self._by_model, self._unread, self._model_of
        ready, blocked, starved = self._ready, self._blocked, self._starved
        limit = self.dispatch_limit
        listing = self._placing and self._current  # (where nothing stays current, `place` reads every room)
        for iid in ids:
            # `room_of` but for what `fresh_blocks` reads when the room is chosen (free blocks, prompt tokens).
            inst = insts[iid]
            prof = inst.profile
            old_model = model_of.get(iid)
            if inst.swapping or not inst.healthy or prof is None:
                rm = None
            else:
                load = inst.num_running + inst.num_waiting
                rm = Room(inst, prof.max_num_seqs + limit - load, 0, load, prof.block_size, iid=iid)
            rooms[iid] = rm
            if rm is not None and old_model is not None and inst.model == old_model:
                # The common case, the same model on a healthy engine: its new room replaces the old one where
                # that was filed (the dicts' order is not read: every caller picks by load, then instance id).
                open_[iid] = ready[iid] = by_model[old_model][iid] = rm
                was = blocked[old_model]
                if iid in was:
                    del was[iid]
                if iid in starved:
                    del starved[iid]
                if listing:
                    unread[old_model].append(rm)
                continue
            # (`in` and `del`, not `pop(iid, None)`: compiled, these are primitives and `pop` a method call)
            if old_model is not None:
                del model_of[iid]
                was = by_model[old_model]
                if iid in was:
                    del was[iid]
                was = blocked[old_model]
                if iid in was:
                    del was[iid]
            if iid in ready:
                del ready[iid]
            if iid in starved:
                del starved[iid]
            if rm is None:
                unloaded.add(iid)
                if iid in open_:
                    del open_[iid]
            else:
                unloaded.discard(iid)
                open_[iid] = rm
                ready[iid] = rm
                model = inst.model
                assert model is not None
                serving = by_model.get(model)
                if serving is None:
                    serving = by_model[model] = {}
                    blocked[model] = {}
                    unread[model] = []
                    self._caps[model] = []
                    self._loads[model] = []
                serving[iid] = rm
                if listing:
                    unread[model].append(rm)
                model_of[iid] = model
        if stale is None:
            self._stale = set()
        else:
            stale.clear()

    def get(self, instance_id: int) -> Room | None:
        return self._rooms.get(instance_id)

    def open_list(self) -> list[Room]:
        """Each serving instance's room that has a free slot and is not blocked, in no particular order (a
        caller takes the least loaded first: `Room.load`, then `Room.iid`). The caller reports each room that
        takes a request with `took`."""
        for rm in [rm for rm in self._ready.values() if rm.slots <= 0]:
            self._close(rm)  # a full room opens again only as a new Room, at a refresh
        return list(self._ready.values())

    def least_loaded(self) -> Room | None:
        """The room of `open_list` with the least load (ties: the lowest instance id), or None. A caller that
        dispatches one request at a time asks again after each: a room it blocks leaves the open ones, and one
        it fills is passed over (and closed at the next look). Cheaper than `open_list` where most calls
        dispatch one request: nothing is listed."""
        best: Room | None = None
        full: list[Room] | None = None
        # (Over a copy as a list: compiled, a list is read natively, and copying one from a dict costs less than
        # stepping through the dict.)
        for rm in list(self._ready.values()):
            if rm.slots > 0:
                if best is None or rm.load < best.load or (rm.load == best.load and rm.iid < best.iid):
                    best = rm
            elif full is None:
                full = [rm]
            else:
                full.append(rm)
        if full is not None:
            for rm in full:  # a full room opens again only as a new Room, at a refresh
                self._close(rm)
        return best

    def took(self, rm: Room) -> None:
        """`rm`, from `open_list` or `least_loaded`, took a request (`Room.take`): what it took stops counting at
        the next refresh (the engine shows it then). Only rooms that took are listed, not every room handed out."""
        self._handed.append(rm)

    def place(self, model: str, r: Request) -> Room | None:
        """The least-loaded open room of `model` (ties: lowest instance id) that `r` fits, or None.

        Where rooms stay current between touches (`tracks_steps` and a world that reports steps), only rooms
        refreshed since the last call are read, and the rooms with KV for `r` come off a heap by free KV, so a
        call costs what changed and what fits, not the number of instances. After `Room.take`, the caller
        reports it with `taken`.
        """
        if not self._placing:  # from now on rooms refreshed or stepped are listed for this
            self._placing = True
            for m, rooms in self._by_model.items():
                self._unread[m] = list(rooms.values()) if self._current else []
        serving = self._by_model.get(model)
        if not serving:
            return None
        current = self._current
        if not current or len(serving) <= self.scan_rooms:
            # A look at each room (few, or none stays current); in a world that reports steps, only the rooms
            # out of date are read again.
            if current:
                self._unread[model] = []
                self._heaped.discard(model)
            found: Room | None = None
            found_key = (0, 0)
            for iid, rm in list(serving.items()):
                if rm.slots <= 0:
                    self._close(rm)
                    continue
                if not (current and rm.read):
                    self.fresh_blocks(rm)
                if rm.fits(r) and (found is None or (rm.load, iid) < found_key):
                    found, found_key = rm, (rm.load, iid)
            return found
        caps, loads = self._caps[model], self._loads[model]
        unread = self._unread[model]
        self._unread[model] = []
        if model not in self._heaped:  # (again) after looks at each room: the heaps from all of them
            self._heaped.add(model)
            for rm in list(serving.values()):
                if rm.slots <= 0:
                    self._close(rm)
                elif not rm.read:
                    self.fresh_blocks(rm)
            self._heap_up(serving, caps, loads)
        elif unread:
            for rm in unread:
                iid = rm.inst.instance_id
                if serving.get(iid) is not rm:
                    continue  # refreshed again, or full, since
                if rm.slots <= 0:
                    self._close(rm)
                    continue
                if not rm.read:
                    self.fresh_blocks(rm)
                cap = _kv_room(rm)
                if (cap, rm.load) != rm.heap_key:  # else its entries stand
                    rm.heap_key = (cap, rm.load)
                    heappush(caps, (-cap, iid, id(rm), rm))
                    heappush(loads, (rm.load, iid, id(rm), rm))
            if len(caps) + len(loads) > 8 * len(serving) + 64:  # stale entries pile up
                self._heap_up(serving, caps, loads)
        # Entries of rooms since replaced, closed or changed are stale: dropped as they come up.
        # The most free KV any room has (in tokens, so that block sizes may differ): too little, and `r` fits
        # nowhere (`Room.fits` needs its tokens and one more).
        tokens = r.prompt_tokens + r.generated_tokens + 1
        while caps and (serving.get(caps[0][1]) is not caps[0][3] or -caps[0][0] != _kv_room(caps[0][3])):
            heappop(caps)
        if not caps or -caps[0][0] < tokens:
            return None
        # The least-loaded room `r` fits: walk up the load heap to the first that fits, and at the same pace
        # down the KV heap through every room with KV for `r`; whichever ends first answers, so a call costs
        # the fewer of the rooms passed over and the rooms that fit. What came off goes back.
        held_l: list[tuple[int, int, int, Room]] = []
        held_c: list[tuple[float, int, int, Room]] = []
        best: Room | None = None
        cand: Room | None = None
        cand_key = (0, 0)
        while True:
            while loads and (serving.get(loads[0][1]) is not loads[0][3] or loads[0][0] != loads[0][3].load):
                heappop(loads)
            if not loads:
                break
            rm = loads[0][3]
            if rm.fits(r):
                best = rm
                break
            held_l.append(heappop(loads))
            while caps and (serving.get(caps[0][1]) is not caps[0][3] or -caps[0][0] != _kv_room(caps[0][3])):
                heappop(caps)
            if not caps or -caps[0][0] < tokens:
                best = cand  # every room with KV for `r` looked at
                break
            e = heappop(caps)
            held_c.append(e)
            rm = e[3]
            if rm.fits(r) and (cand is None or (rm.load, e[1]) < cand_key):
                cand, cand_key = rm, (rm.load, e[1])
        for el in held_l:
            heappush(loads, el)
        for ec in held_c:
            heappush(caps, ec)
        return best

    @staticmethod
    def _heap_up(serving: dict[int, Room], caps: list, loads: list) -> None:
        """`place`'s heaps made anew from the rooms of `serving` (all read and current)."""
        for rm in serving.values():
            rm.heap_key = (_kv_room(rm), rm.load)
        caps[:] = [(-rm.heap_key[0], iid, id(rm), rm) for iid, rm in serving.items()]
        loads[:] = [(rm.load, iid, id(rm), rm) for iid, rm in serving.items()]
        heapify(caps)
        heapify(loads)

    def taken(self, rm: Room) -> None:
        """`rm` took a request (`Room.take`): a full room leaves the open ones until it is refreshed."""
        self._handed.append(rm)
        if rm.slots <= 0:
            self._close(rm)
        elif self._current and self._model_of[rm.inst.instance_id] in self._heaped:
            model, iid = self._model_of[rm.inst.instance_id], rm.inst.instance_id
            cap = _kv_room(rm)
            rm.heap_key = (cap, rm.load)
            heappush(self._caps[model], (-cap, iid, id(rm), rm))
            heappush(self._loads[model], (rm.load, iid, id(rm), rm))

    def _close(self, rm: Room) -> None:
        iid = rm.inst.instance_id
        model = self._model_of[iid]
        self._open.pop(iid, None)
        self._by_model[model].pop(iid, None)
        self._ready.pop(iid, None)
        self._blocked[model].pop(iid, None)
        self._starved.pop(iid, None)

    def block(self, rm: Room) -> None:
        """`rm` had nothing it could take: skip it until its instance or its model's queue changes (`unblock`,
        a refresh). A room whose prompt-token budget is spent (`Room.fits` refuses every request) waits for
        its engine to step as well (`stepped`): under heavy traffic most rooms are in that state, and an
        arrival would otherwise try each of them in turn."""
        iid = rm.inst.instance_id
        if self._ready.get(iid) is not rm:
            return
        del self._ready[iid]
        if self._current and rm.read and rm.tokens <= 0 and rm.load > 0:
            self._starved[iid] = rm
        else:
            self._blocked[self._model_of[iid]][iid] = rm

    def unblock(self, models: set[str]) -> None:
        """New requests of these models arrived: blocked rooms serving them may take them."""
        blocked, ready = self._blocked, self._ready
        for m in models:
            rooms = blocked.get(m)
            if rooms:
                for iid, rm in list(rooms.items()):
                    if rm.inst.model == m:  # (one that began a swap since its refresh waits for the next one)
                        del rooms[iid]
                        ready[iid] = rm

    def rooms(self) -> list[Room]:
        """Rooms of every serving instance."""
        return [rm for rm in self._rooms.values() if rm is not None]

    def unloaded(self) -> list[int]:
        """Instances serving nothing now (no model, swapping or unhealthy), in instance order."""
        return sorted(self._unloaded) if self._unloaded else []

    def stepped(self, instance_id: int) -> None:
        """The instance's engine stepped (`Policy.on_instance_stepped`): what was read of its room is out of date.
        The room itself (its slots, load, and whether it is blocked) stands; `touch` replaces it."""
        rm = self._rooms.get(instance_id)
        if rm is None or not rm.read:
            return  # (a starved room has been read: `block`, and a step or a refresh ends both)
        if self._starved.get(instance_id) is rm:  # its token budget is spent no more
            del self._starved[instance_id]
            self._blocked[self._model_of[instance_id]][instance_id] = rm
        rm.read = False
        model = self._model_of.get(instance_id)
        if model is not None and self._placing and self._current:
            self._unread[model].append(rm)

    def read(self, rm: Room) -> None:
        """`fresh_blocks`, unless what was read of `rm` is still current (see `tracks_steps`)."""
        if not (rm.read and self._current):
            self.fresh_blocks(rm)

    def fresh_blocks(self, rm: Room) -> None:
        """Re-read what shrinks between events: free KV blocks (decoding), and prefill tokens (each step)."""
        inst = rm.inst
        rm.read = True
        rm.blocks = inst.free_kv_blocks - rm.taken_blocks
        if self.lookahead_steps is not None:
            prof = inst.profile  # (read once: through the instance view, each read is a lookup)
            assert prof is not None
            tokens = _token_room(prof, inst.num_running, inst.pending_prefill_tokens, self.lookahead_steps)
            rm.tokens = tokens - rm.taken_tokens

