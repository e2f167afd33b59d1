"""Outlier ejection: an engine whose attempts fail too often is taken out for a while (as Envoy's outlier
detection does with its failure-percentage rule).

`live.unhealthy_after` failures in a row already mark an engine unhealthy; an engine that fails one attempt
in three answers in between and never gets there, while the requests it fails spend their retries. Here
each engine's attempts (a first token: success; any failure but the gateway's own: failure) are counted in
a sliding window of `interval_s` (two buckets: the current one and the one before). Once the window holds
at least `min_requests` attempts and `error_rate` or more of them failed, the engine is ejected for
`ejection_s`, doubled with every ejection in a row (at most `MAX_DOUBLINGS` times); a window judged clean
afterwards resets the doubling. Its window starts afresh when it comes back.

The detector only says when to eject; `qlmctl.gateway.health.HealthMonitor` carries it out (and never
ejects the last healthy engine of a model this way: an engine that fails a third of its requests is
better than none).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DOUBLINGS = 3
"""An engine ejected again and again is out for at most 2**3 = 8 times `ejection_s`."""


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    error_rate: float = 0.25
    min_requests: int = 10
    interval_s: float = 10.0
    ejection_s: float = 30.0


@dataclass(slots=True)
class _Window:
    start: float = 0.0
    """Loop time the current bucket began."""
    attempts: int = 0
    failures: int = 0
    prev_attempts: int = 0
    prev_failures: int = 0
    ejections: int = 0
    """Ejections in a row (the doubling)."""


class OutlierDetector:
    """Per-engine failure rates over a sliding window; says when an engine is an outlier."""

    def __init__(self, policy: OutlierPolicy | None = None) -> None:
        self.policy = policy or OutlierPolicy()
        self._windows: dict[object, _Window] = {}

    def _window(self, key: object, now: float) -> _Window:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(start=now)
        half = self.policy.interval_s / 2
        if now - w.start >= half:
            if now - w.start >= 2 * half:  # a whole window without attempts: nothing carries over
                w.prev_attempts = w.prev_failures = 0
            else:
                w.prev_attempts, w.prev_failures = w.attempts, w.failures
            w.attempts = w.failures = 0
            w.start = now
        return w

    def observe(self, key: object, now: float, failed: bool) -> float | None:
        """An attempt on engine `key` succeeded or failed at loop time `now`: the seconds to eject it for, if
        it is now an outlier (None otherwise)."""
        p = self.policy
        w = self._window(key, now)
        w.attempts += 1
        w.failures += failed
        attempts = w.attempts + w.prev_attempts
        if attempts < p.min_requests:
            return None
        failures = w.failures + w.prev_failures
        if failures < p.error_rate * attempts:
            if not failed:
                w.ejections = 0  # judged clean: the next ejection starts from ejection_s again
            return None
        if not failed:
            return None  # ejected on a failure, not on the success that follows it
        eject_s = p.ejection_s * 2 ** min(w.ejections, MAX_DOUBLINGS)
        w.ejections += 1
        return eject_s

    def rate(self, key: object, now: float) -> tuple[int, int]:
        """(attempts, failures) of engine `key` in its window."""
        w = self._window(key, now)
        return w.attempts + w.prev_attempts, w.failures + w.prev_failures

    def readmitted(self, key: object, now: float) -> None:
        """Engine `key` takes requests again: its window starts afresh (its doubling stays)."""
        w = self._windows.get(key)
        if w is not None:
            w.start = now
            w.attempts = w.failures = w.prev_attempts = w.prev_failures = 0
