"""Calibrated TTFT predictions: the estimator's mean prediction times a factor learned online, so that about
the configured percentile of requests get their first token within their prediction.

The factor follows adaptive conformal inference (Gibbs and Candès, 2021), i.e. online quantile tracking of
the log ratio actual / mean: after each outcome its logarithm moves by `step * (miss - (1 - percentile))`,
so misses raise it and hits lower it, and the share of misses tends to 1 - percentile as long as the ratio's
distribution moves slowly against the step. (It does not where the scheduler gives up a share of requests
until an overload passes: their waits end with the overload, which no prediction can see.) A window of past ratios (actual /
predicted) cannot follow a queue that grows: under load the ratios come back only when the requests start,
long after the load changed. Here a miss is known as soon as a request has waited longer than the current
factor allows, so the feedback is never later than the prediction itself. Each outcome is judged against
the factor of the moment (a request counts as a miss only while it is beyond the current factor, not the
one it was predicted with): counting against old factors would raise the factor once for every request
already in flight when the load rose, overshooting by as many requests as the queue holds.

Outcomes of one key that come together (within `GROUP_S` of the first) move the factor as one step, by their
share of misses: they are one piece of evidence, not many. Requests that start in the same engine step, or
all at once when a swap brings their model in, were decided together; counted one by one, the hundreds of hits
of one swap-in drove the factor far down (W_B: coverage 0.70 -> 0.88 at 30 req/s with the grouping). A miss
is dated when the request's wait passed its prediction, not when a call found it: calls come when the
scheduler runs, up to seconds apart, and misses found together in one late call are not one piece of
evidence (dated by the call, they moved the factor once where hits, spread over engine steps, moved it many
times: W_A at 30 and 80 req/s sat at 0.84-0.85).

Factors are kept per key (the caller's: model, class, whether the model is loaded, whether it waits on swaps).

**Up to the deadline.** Where the caller gives a request's deadline, its key learns instead where between the
mean and the deadline the request starts: the prediction is `mean + w * (deadline - mean)`, the weight `w` in
[0, 1] following the same rule (`WEIGHT_STEP`), starting at the percentile. For a deadline-driven scheduler
the mean is then a lower bound: qlm serves a model that is not loaded, or whose instances a coming swap takes
away, when its requests' slack runs low (a swap waits while the group can; the group is served in portions,
between other models' turns), so they start somewhere before their deadline, rarely after it. As a factor on
the mean, the first swap cycle was predicted with no feedback at all (the swap comes hundreds of seconds after
the arrivals) and most of it missed (W_B at 45 req/s: 3B batch-1 requests waiting on a swap, coverage 0.35).
"""

from __future__ import annotations

import math
from bisect import insort
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

INF: Final = math.inf

STEP: Final = 0.05
"""How far one outcome moves the log factor. With percentile p, a miss moves it up by STEP * p and a hit
down by STEP * (1 - p): about 20 misses in a row double the factor at p = 0.9."""

WEIGHT_STEP: Final = 0.01
"""How far one outcome moves a key's weight between the mean and the deadline (a share of that interval, which
can be most of the SLO). Small, so that one swap cycle's outcomes, all alike, do not throw the weight from one
end to the other (W_B at 60 req/s: coverage 0.885 at 0.01, 0.864 at 0.02, 0.858 at 0.05; no better elsewhere)."""

GROUP_S: Final = 0.05
"""Outcomes of a key within this many seconds of the group's first are one step (a few engine steps)."""


class _Outcomes:
    """Outcomes of one key that count as one step (see GROUP_S); a record, not a list of three numbers: compiled,
    its fields are read and counted without boxing."""

    def __init__(self, first_s: float) -> None:
        self.first_s = first_s
        """Time of the first."""
        self.misses = 0
        self.n = 0


class _Key:
    """One key's state: its factor, and its outcomes not applied yet. A prediction holds its key's record, so
    that its outcome reaches them without a lookup by key."""

    def __init__(self, key: Hashable, theta: float, weighted: bool) -> None:
        self.key = key
        self.theta = theta
        """Its log factor; for a key that learns a weight between the mean and the deadline, that weight."""
        self.weighted = weighted
        self.outcomes: _Outcomes | None = None


@dataclass(slots=True, init=False)
class _Pending:
    arrival_s: float
    mean_s: float
    """The estimator's mean TTFT prediction."""
    key: _Key
    """Whose factor the outcome updates."""
    due_s: float
    """When its wait passes the key's factor, as of the last check."""
    room_s: float | None
    """Its deadline less its mean (from arrival, at least 0), for a key that learns a weight; else None."""

    # Written out: the dataclass's generated one would be interpreted code in the compiled build.
    def __init__(self, arrival_s: float, mean_s: float, key: _Key, due_s: float, room_s: float | None) -> None:
        self.arrival_s = arrival_s
        self.mean_s = mean_s
        self.key = key
        self.due_s = due_s
        self.room_s = room_s

    def pred_s(self, theta: float) -> float:
        """Its prediction with the key's factor (or weight) `theta`."""
        if self.room_s is None:
            return self.mean_s * math.exp(theta)
        return self.mean_s + theta * self.room_s


DUE_BINS_PER_S: Final = 16.0
"""`DueQueue`'s bins a second: a few dozen predictions each at hundreds of arrivals a second."""


class DueQueue:
    """The pending predictions' (due time, request id) entries, read in that order up to a time: a calendar
    queue. Entries go into bins by due time (1 / DUE_BINS_PER_S wide), unsorted; when the reading reaches a
    bin, its entries still live (`live`) are sorted. A heap of every entry cost more: most go stale unread
    (their request starts first), and each pop sifted through all of them. An entry stays live until its
    prediction is taken out of `pending` or due again later (a due time only moves later)."""

    def __init__(self, pending: dict[int, _Pending]) -> None:
        self.pending = pending
        """The calibration's pending predictions, by request id."""
        self._bins: dict[int, list[tuple[float, int]]] = {}
        """The bins after `_bin`, by index (`_bin_of`)."""
        self._cur: list[tuple[float, int]] = []
        """The entries of bin `_bin` and earlier, sorted; those before `_at` have been read."""
        self._at = 0
        self._bin = -(1 << 40)  # (before any time)

    @staticmethod
    def _bin_of(t: float) -> int:
        # Truncated, not floored: any index that never decreases as `t` grows will do, and this one is native.
        return int(t * DUE_BINS_PER_S)

    def live(self, due: float, request_id: int) -> bool:
        p = self.pending.get(request_id)
        return p is not None and p.due_s == due

    def push(self, due: float, request_id: int) -> None:
        if not -INF < due < INF:
            return  # NaN (a degenerate estimate), or never due
        b = self._bin_of(due)
        if b <= self._bin:
            insort(self._cur, (due, request_id), lo=self._at)
            return
        entries = self._bins.get(b)
        if entries is None:
            self._bins[b] = [(due, request_id)]
        else:
            entries.append((due, request_id))

    def next_before(self, now: float) -> tuple[float, int] | None:
        """The first entry not read yet, if it is due before `now` (it counts as read); else None. It may have
        gone stale since its bin was reached: the caller checks (`live`)."""
        while True:
            at = self._at
            cur = self._cur
            if at < len(cur):
                entry = cur[at]
                if entry[0] < now:
                    self._at = at + 1
                    return entry
                return None  # (every entry of a later bin is later still)
            bins = self._bins
            if not bins:
                return None
            last = self._bin_of(now) if now < INF else max(bins)
            if last <= self._bin:
                return None
            # The next bin up to `last`'s that holds entries (its index looked for, or the least one's taken).
            nxt = -1
            found = False
            if last - self._bin <= len(bins):
                b = self._bin + 1
                while b <= last:
                    if b in bins:
                        nxt, found = b, True
                        break
                    b += 1
            else:
                nxt = min(bins)
                found = nxt <= last
            if not found:
                self._bin = last
                self._cur = []
                self._at = 0
                return None
            entries = [e for e in bins.pop(nxt) if self.live(e[0], e[1])]
            entries.sort()
            self._bin = nxt
            self._cur = entries
            self._at = 0


class TTFTCalibration:
    """Calibrated TTFT predictions for one policy (no global state)."""

    def __init__(self, percentile: float, step: float = STEP, group_s: float = GROUP_S,
                 weight_step: float = WEIGHT_STEP) -> None:
        self.percentile = percentile
        self.step = step
        self.weight_step = weight_step
        self.group_s = group_s
        self._keys: dict[Hashable, _Key] = {}
        self._groups: dict[Hashable, _Key] = {}
        """The keys with outcomes not applied yet."""
        self._groups_first = math.inf  # the earliest first time among `_groups` (advance's quick test)
        self._pending: dict[int, _Pending] = {}
        self._due = DueQueue(self._pending)
        """The pending predictions by due time (stale entries skipped)."""
        self.hits = 0
        self.misses = 0

    def predict(self, request_id: int, arrival_s: float, mean_s: float, first_guess_s: float,
                key: Hashable, ttft_slo_s: float | None = None) -> float:
        """The calibrated TTFT (s, from arrival) of a request whose mean TTFT the estimator puts at `mean_s`.
        `first_guess_s` (the estimator's own percentile) sets the factor of a key never seen before. With
        `ttft_slo_s` (its deadline, from arrival), the key learns a weight between the mean and the deadline
        instead (a key is one or the other: the caller keeps them apart)."""
        mean_s = max(mean_s, 1e-3)
        room = None
        if ttft_slo_s is not None:
            mean_s = min(mean_s, ttft_slo_s)  # a mean past the deadline: the deadline (the weight is moot)
            room = ttft_slo_s - mean_s
        rec = self._keys.get(key)
        if rec is None:
            if room is None:
                rec = _Key(key, math.log(max(1.0, first_guess_s / mean_s)), False)
            else:
                rec = _Key(key, self.percentile, True)
            self._keys[key] = rec
        p = _Pending(arrival_s, mean_s, rec, 0.0, room)
        pred = p.pred_s(rec.theta)
        due = p.due_s = arrival_s + pred
        self._pending[request_id] = p
        self._due.push(due, request_id)
        return pred

    def first_token(self, request_id: int, now: float) -> None:
        """A request got its first token at `now`: a hit if within the current factor (one beyond it was
        counted a miss already, or is now)."""
        p = self._pending.pop(request_id, None)
        if p is not None:
            self._update(p.key, now - p.arrival_s > p.pred_s(p.key.theta), now)

    def forget(self, request_id: int) -> None:
        """A request ended without a first token before its prediction ran out (refused, failed): no outcome."""
        self._pending.pop(request_id, None)

    def advance(self, now: float) -> None:
        """Count as misses the requests still without a first token that have waited beyond the factor."""
        groups = self._groups
        if now - self._groups_first > self.group_s:
            expired: list[_Key] = []
            first = math.inf
            for rec in groups.values():
                g = rec.outcomes
                assert g is not None
                if now - g.first_s > self.group_s:
                    expired.append(rec)
                elif g.first_s < first:
                    first = g.first_s
            for rec in expired:
                del groups[rec.key]
                self._apply(rec)
            self._groups_first = first
        due = self._due
        pending = self._pending
        while True:
            entry = due.next_before(now)
            if entry is None:
                break
            d, rid = entry
            p = pending.get(rid)
            if p is None or p.due_s != d:
                continue  # started, forgotten, or pushed back since
            p.due_s = p.arrival_s + p.pred_s(p.key.theta)
            if p.due_s < now:
                del pending[rid]
                self._update(p.key, True, p.due_s)  # when it became a miss: calls come seconds apart
            else:  # the factor rose since: not a miss yet
                due.push(p.due_s, rid)

    def _update(self, rec: _Key, miss: bool, now: float) -> None:
        if miss:
            self.misses += 1
        else:
            self.hits += 1
        g = rec.outcomes
        if g is not None and now - g.first_s > self.group_s:
            del self._groups[rec.key]
            self._apply(rec)
            g = None
        if g is None:
            g = rec.outcomes = _Outcomes(now)
            self._groups[rec.key] = rec
            if now < self._groups_first:
                self._groups_first = now
        if miss:
            g.misses += 1
        g.n += 1

    def _apply(self, rec: _Key) -> None:
        """One step for a key's group of outcomes: up by its share of misses, down by the share the percentile
        allows."""
        g = rec.outcomes
        assert g is not None
        rec.outcomes = None
        misses, n = g.misses, g.n
        if rec.weighted:
            # Kept in [0, 1]: misses past the deadline (SLO violations) would wind it up beyond the deadline,
            # where the hits that follow would take as long to bring it back.
            w = rec.theta + self.weight_step * (misses / n - (1.0 - self.percentile))
            rec.theta = min(1.0, max(0.0, w))
        else:
            rec.theta += self.step * (misses / n - (1.0 - self.percentile))

    def thetas(self) -> dict[Hashable, float]:
        """Per key, its log factor (or, for a key that learns a weight between the mean and the deadline, its
        weight)."""
        return {key: rec.theta for key, rec in self._keys.items()}
