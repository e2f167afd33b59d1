"""Request groups: requests with the same model and a similar SLO, served FCFS inside the group."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from qlmctl.core.request import Request

LATE_BUCKET: Final = 1 << 30
"""Bucket of requests whose deadline has passed: they go last, as they count as misses anyway."""


class GroupKey(NamedTuple):
    """A group's identity. A named tuple, not a frozen dataclass: policies look groups up by key on every call,
    and a tuple hashes and compares in C (the same values, order and hash as the dataclass's)."""

    model: str
    bucket: int
    """SLO bucket: floor(ttft_slo / bucket width), or LATE_BUCKET (plus a class's rank, where late requests
    keep their class's precedence)."""


@dataclass(slots=True, eq=False)
class RequestGroup:
    key: GroupKey
    slo_s: float
    """TTFT deadline of the group's requests (the smallest seen), s."""
    queue: deque[Request] = field(default_factory=deque)
    # The key's parts policies read on every call, as plain attributes (the key never changes).
    model: str = field(init=False)
    late: bool = field(init=False)
    """A late group: its requests' deadlines have passed."""
    # The head found ready (not hopeless) at a time, with the owner's generation then (its admission lag's):
    # asked again for the same head at the same time, the answer stands (see `QLMBasicPolicy._ready_head`).
    ready_head: Request | None = field(init=False, default=None)
    ready_s: float = field(init=False, default=-1.0)
    ready_gen: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        self.model = self.key.model
        self.late = self.key.bucket >= LATE_BUCKET

    def __len__(self) -> int:
        return len(self.queue)

    def head_deadline(self) -> float:
        """Deadline of the request served next (inf when empty)."""
        return self.queue[0].deadline_s if self.queue else float("inf")


def group_key(request: Request, bucket_s: float) -> GroupKey:
    return GroupKey(request.model, int(request.ttft_slo_s // bucket_s))
