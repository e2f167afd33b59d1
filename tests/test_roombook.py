"""RoomBook.place: the least-loaded instance a request fits, whether rooms are re-read on every call (live) or
kept between the touches a world that reports steps sends (the simulator), against a brute-force answer."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from qlmctl.core.request import Request
from qlmctl.policies.common import RoomBook


@dataclass
class _Profile:
    max_num_seqs: int = 4
    block_size: int = 16
    max_num_batched_tokens: int = 8192


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
    profile: _Profile = field(default_factory=_Profile)


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


@pytest.mark.parametrize("steps_reported", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_place_is_the_least_loaded_room_that_fits(steps_reported: bool, seed: int) -> None:
    rng = random.Random(seed)
    insts = [_Inst(i, rng.choice(["a", "b"]), rng.randrange(0, 40), profile=_Profile(block_size=rng.choice([16, 32])))
             for i in range(7)]
    cluster = _Cluster(insts, steps_reported)
    book = RoomBook(dispatch_limit=0, tracks_steps=True)
    rid = 0
    placed = 0
    for _call in range(300):
        # The world moves on: some engines step (blocks freed or used, requests finish), and say so.
        for inst in rng.sample(insts, rng.randrange(0, 4)):
            inst.free_kv_blocks = max(0, inst.free_kv_blocks + rng.randrange(-10, 15))
            if inst.num_running and rng.random() < 0.4:
                inst.num_running -= 1
            if rng.random() < 0.05:
                inst.swapping = not inst.swapping
            book.touch(inst.instance_id)  # what on_instance_stepped / on_finished do
        book.refresh(cluster)
        taken: dict[int, tuple[int, int]] = {}
        for _ in range(rng.randrange(1, 5)):
            rid += 1
            r = _request(rid, rng.choice(["a", "b"]), rng.randrange(1, 600))
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
    assert placed > 50  # the walk did place requests, not only turn them away
