"""RoomBook.place: the least-loaded instance a request fits, whether rooms are re-read on every call (live) or
kept between the touches a world that reports steps sends (the simulator), against a brute-force answer."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from qlmctl.core.request import Request
from qlmctl.policies.common import RoomBook
from simulator.profile import EngineProfile
from tests.conftest import small_profile


def _profile(max_num_seqs: int = 4, block_size: int = 16) -> EngineProfile:
    # A real profile, not a stand-in: the compiled build (setup.py) checks the type of what it reads.
    return small_profile(max_num_seqs=max_num_seqs, block_size=block_size, max_num_batched_tokens=8192)


@dataclass
class _Inst:
    instance_id: int
    model: str
    free_kv_blocks: int
    num_running: int = 0
    num_waiting: int = 0
    pending_prefill_tokens: int = 0
    swapping: bool = False
    healthy: bool = True
    profile: EngineProfile = field(default_factory=_profile)


@dataclass
class _Cluster:
    instances: list[_Inst]
    steps_reported: bool

    def now(self) -> float:
        return 0.0


def _request(rid: int, model: str, prompt: int) -> Request:
    return Request(request_id=rid, arrival_s=0.0, model=model, prompt_tokens=prompt, output_tokens=8,
                   slo_class="c", ttft_slo_s=1.0)


def _brute(insts: list[_Inst], taken: dict[int, tuple[int, int]], r: Request) -> int | None:
    """Least (load, id) among the instances of r's model with a slot and the blocks r needs (or nothing on)."""
    best = None
    for inst in insts:
        if inst.model != r.model or inst.swapping or not inst.healthy:
            continue
        n_taken, b_taken = taken.get(inst.instance_id, (0, 0))
        load = inst.num_running + inst.num_waiting + n_taken
        if inst.profile.max_num_seqs - load <= 0:
            continue
        need = -(-(r.prompt_tokens + 1) // inst.profile.block_size)
        if inst.free_kv_blocks - b_taken >= need or load == 0:
            if best is None or (load, inst.instance_id) < best[0]:
                best = ((load, inst.instance_id), inst.instance_id)
    return None if best is None else best[1]


@pytest.mark.parametrize("scan_rooms", [0, 8], ids=["heaps", "scan"])
@pytest.mark.parametrize("steps_reported", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_place_is_the_least_loaded_room_that_fits(steps_reported: bool, seed: int, scan_rooms: int) -> None:
    rng = random.Random(seed)
    insts = [_Inst(i, rng.choice(["a", "b"]), rng.randrange(0, 40),
                   profile=_profile(max_num_seqs=8, block_size=rng.choice([16, 32])))
             for i in range(4)]
    cluster = _Cluster(insts, steps_reported)
    book = RoomBook(dispatch_limit=0, tracks_steps=True, scan_rooms=scan_rooms)
    rid = 0
    placed = 0
    for _call in range(1500):
        # The world moves on: some engines step (blocks freed or used, requests finish), and say so.
        for inst in rng.sample(insts, rng.randrange(0, 4)):
            if inst.num_running and rng.random() < 0.5:
                # A request finished (on_finished) or the instance swapped (on_instance_changed): a new room.
                inst.num_running -= 1
                inst.free_kv_blocks += rng.randrange(0, 40)
                inst.swapping = inst.swapping != (rng.random() < 0.1)
                book.touch(inst.instance_id)
            else:
                # A step (on_instance_stepped): decodes take blocks, a preemption gives some back; the room
                # stands, only what was read of it is out of date.
                inst.free_kv_blocks = max(0, inst.free_kv_blocks + rng.choice([-20, -5, 0, 10, 30]))
                book.stepped(inst.instance_id)
        book.refresh(cluster)
        taken: dict[int, tuple[int, int]] = {}
        for _ in range(rng.randrange(0, 3)):
            rid += 1
            r = _request(rid, rng.choice(["a", "b"]), rng.randrange(1, 900))
            rm = book.place(r.model, r)
            want = _brute(insts, taken, r)
            assert (rm.inst.instance_id if rm else None) == want, f"call {_call}, request {rid}"
            if rm is None:
                continue
            placed += 1
            rm.take(r)
            book.taken(rm)
            n, b = taken.get(want, (0, 0))
            taken[want] = (n + 1, b + -(-(r.prompt_tokens + 1) // rm.block_size))
        # The dispatches reach the engines, which step (and are touched) as the simulator's would.
        for iid, (n, b) in taken.items():
            insts[iid].num_running += n
            insts[iid].free_kv_blocks -= b
            book.touch(iid)
    assert placed > 10  # the walk did place requests, not only turn them away


def test_a_step_makes_what_was_read_of_a_room_out_of_date() -> None:
    """In a world that reports steps, a room read once is not read again until its engine steps; then it is."""
    inst = _Inst(0, "a", free_kv_blocks=100)
    cluster = _Cluster([inst], steps_reported=True)
    book = RoomBook(dispatch_limit=0, tracks_steps=True, scan_rooms=0)  # the heaps
    r = _request(1, "a", 320)  # 21 blocks of 16
    inst.num_running = 1
    book.refresh(cluster)
    assert book.place("a", r) is not None
    inst.free_kv_blocks = 5  # decodes took the blocks, unannounced: the room read stands (the contract)
    book.refresh(cluster)
    assert book.place("a", r) is not None
    book.stepped(0)  # ...until the step is reported
    book.refresh(cluster)
    assert book.place("a", r) is None
    inst.free_kv_blocks = 40
    book.stepped(0)
    book.refresh(cluster)
    assert book.place("a", r) is book.get(0)


def test_read_skips_a_room_read_since_its_last_step() -> None:
    """`RoomBook.read` (qlm's dispatch loop) re-reads a room only after a reported step."""
    inst = _Inst(0, "a", free_kv_blocks=100, num_running=1)
    cluster = _Cluster([inst], steps_reported=True)
    book = RoomBook(dispatch_limit=0, tracks_steps=True)
    book.refresh(cluster)
    rm = book.get(0)
    book.read(rm)
    assert rm.blocks == 100
    inst.free_kv_blocks = 7
    book.read(rm)
    assert rm.blocks == 100  # nothing reported: what was read stands
    book.stepped(0)
    book.read(rm)
    assert rm.blocks == 7
    live = RoomBook(dispatch_limit=0, tracks_steps=True)  # a world that does not report steps: always read
    live.refresh(_Cluster([inst], steps_reported=False))
    rm = live.get(0)
    live.read(rm)
    inst.free_kv_blocks = 3
    live.read(rm)
    assert rm.blocks == 3


def test_a_world_that_does_not_report_steps_leaves_nothing_listed() -> None:
    """Live (no reported steps) every room is read on every call: nothing piles up for later reading, however
    long the gateway runs."""
    insts = [_Inst(i, "a", free_kv_blocks=50, num_running=1) for i in range(3)]
    cluster = _Cluster(insts, steps_reported=False)
    book = RoomBook(dispatch_limit=0, tracks_steps=True)
    for k in range(1000):
        for inst in insts:
            book.touch(inst.instance_id)
            book.stepped(inst.instance_id)
        book.refresh(cluster)
        book.place("a", _request(k, "a", 100))
    assert sum(len(v) for v in book._unread.values()) == 0


def test_a_room_out_of_prompt_tokens_stays_blocked_until_its_engine_steps() -> None:
    """qlm's dispatch loop blocks a room that took nothing. An arrival opens blocked rooms again, except one
    whose prompt-token budget is spent: no request fits it until its engine steps (then the next arrival does)."""
    starved = _Inst(0, "a", free_kv_blocks=100, num_running=3, pending_prefill_tokens=10**6)
    other = _Inst(1, "a", free_kv_blocks=0, num_running=3)  # blocked for its KV, not its tokens
    cluster = _Cluster([starved, other], steps_reported=True)
    book = RoomBook(dispatch_limit=0, lookahead_steps=2.0, tracks_steps=True)
    book.refresh(cluster)
    for rm in book.open_list():
        book.read(rm)
        assert not rm.fits(_request(1, "a", 10))
        book.block(rm)
    assert book.open_list() == []
    book.unblock({"a"})
    assert [rm.iid for rm in book.open_list()] == [1]  # the starved room waits for a step
    book.block(book.get(1))
    starved.pending_prefill_tokens = 0
    book.unblock({"a"})
    assert [rm.iid for rm in book.open_list()] == [1]  # its step is not reported yet: what was read stands
    book.block(book.get(1))
    book.stepped(0)
    book.unblock({"a"})
    assert sorted(rm.iid for rm in book.open_list()) == [0, 1]
    live = RoomBook(dispatch_limit=0, lookahead_steps=2.0, tracks_steps=True)  # no reported steps: re-read
    starved.pending_prefill_tokens = 10**6
    live.refresh(_Cluster([starved], steps_reported=False))
    rm = live.get(0)
    live.read(rm)
    live.block(rm)
    live.unblock({"a"})
    assert [rm.iid for rm in live.open_list()] == [0]


def test_fcfs_dispatches_once_a_preemption_frees_blocks() -> None:
    """A queue baseline skips calls while nothing it was told of can let its heads fit (a world that reports
    steps). A preemption frees KV blocks without a finish: the world reports it, and the head goes out."""
    from qlmctl.policies import PolicyContext, make_policy

    inst = _Inst(0, "a", free_kv_blocks=2, num_running=2)
    inst.profile_for = lambda m: inst.profile if m == "a" else None  # type: ignore[attr-defined]
    cluster = _Cluster([inst], steps_reported=True)
    pol = make_policy("fcfs", PolicyContext(profiles={"a": _profile(max_num_seqs=8)}))
    r = _request(1, "a", 320)  # 21 blocks of 16
    pol.add_request(r, 0.0)
    assert pol.schedule(cluster) == []
    inst.free_kv_blocks = 60  # the engine preempted a running request
    pol.on_instance_stepped(0)
    pol.on_preempted(_request(99, "a", 900), 0.0)
    out = pol.schedule(cluster)
    assert [(d.request.request_id, d.instance_id) for d in out] == [(1, 0)]
