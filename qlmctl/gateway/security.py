"""Client authentication and secrets of the live gateway.

- API keys: with `live.api_key` set in the scenario, or the environment variable QLMCTL_API_KEY, or
  `live.api_keys`, every request but GET /health must carry `Authorization: Bearer <key>`; others get
  401 with an OpenAI-style body. A key checks in constant time whichever key it matches (the digest of
  what the client sent is compared with every key's, `hmac.compare_digest`, with no early exit).
- What a key may ask for: an `live.api_keys` entry names the SLO classes its requests may use
  (`slo_classes`; `custom` for a TTFT deadline of their own), the tightest TTFT deadline they may have,
  by class or their own (`min_ttft_s`), and its requests' class when they name none
  (`default_slo_class`). A request beyond them gets 403 (`KeyPolicy.check`). `live.api_key` and
  QLMCTL_API_KEY are keys without limits.
- Secrets never leave the process: the scenario's `scheduler.gurobi` licence settings and the API key
  are masked in `Scenario.dump()` (results folders) and never logged, exported in /metrics or put in
  error messages. `SecretFilter` masks them in log records of the `qlmctl` loggers as a last guard.
- The gateway binds 127.0.0.1 unless told otherwise, and takes engine addresses only from the scenario.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from qlmctl.scenario import Scenario

API_KEY_ENV = "QLMCTL_API_KEY"
MASK = "***"
_MIN_SECRET_LEN = 4
"""Shorter values (e.g. a flag "1") are not masked: they would garble every log line."""


def resolve_api_key(scenario: Scenario, explicit: str | None = None) -> str | None:
    """The key clients must send: `explicit`, else live.api_key, else $QLMCTL_API_KEY; None: no auth."""
    if explicit:
        return explicit
    live = scenario.spec.live
    if live is not None and live.api_key is not None and live.api_key.get_secret_value():
        return live.api_key.get_secret_value()
    return os.environ.get(API_KEY_ENV) or None


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What the requests of one API key may ask for (None: no limit)."""

    name: str
    slo_classes: frozenset[str] | None = None
    min_ttft_s: float | None = None
    default_slo_class: str | None = None

    def check(self, slo_class: str | None, ttft_s: float, class_ttft_s: float | None = None) -> str | None:
        """Why a request is refused, or None: of `slo_class` (None: its own deadline alone) whose deadline is
        `ttft_s` (`class_ttft_s`: its class's own, when the request replaced it)."""
        if self.slo_classes is not None:
            own = slo_class is None or (class_ttft_s is not None and ttft_s < class_ttft_s)
            if own and "custom" not in self.slo_classes:
                return f"this API key may not set its own TTFT deadline (it may use SLO classes " \
                       f"{', '.join(sorted(self.slo_classes))}, with their deadlines)"
            if slo_class is not None and slo_class not in self.slo_classes:
                return f"this API key may not use SLO class '{slo_class}' (it may use " \
                       f"{', '.join(sorted(self.slo_classes))})"
        if self.min_ttft_s is not None and ttft_s < self.min_ttft_s:
            return f"this API key's tightest TTFT deadline is {self.min_ttft_s:g} s; the request asks for {ttft_s:g} s"
        return None


UNLIMITED = KeyPolicy("default")
"""The policy of `live.api_key`, QLMCTL_API_KEY, and of every request when no key is set."""


class APIKeyCheck:
    """Checks `Authorization: Bearer <key>` headers against one or more keys, in constant time."""

    def __init__(self, keys: str | Iterable[tuple[str, KeyPolicy]]) -> None:
        pairs = [(keys, UNLIMITED)] if isinstance(keys, str) else list(keys)
        self._keys = [(hashlib.sha256(f"Bearer {k}".encode()).digest(), policy) for k, policy in pairs]

    def policy(self, authorization: bytes | None) -> KeyPolicy | None:
        """The policy of the key in `authorization`; None for a missing or wrong key."""
        if authorization is None:
            return None
        digest = hashlib.sha256(authorization).digest()
        found = None
        for expected, policy in self._keys:  # every key compared: the time does not tell which matched
            if hmac.compare_digest(digest, expected):
                found = policy
        return found

    def ok(self, authorization: bytes | None) -> bool:
        return self.policy(authorization) is not None


def resolve_api_keys(scenario: Scenario, explicit: str | None = None) -> list[tuple[str, KeyPolicy]]:
    """Every key clients may send, with what it allows: `resolve_api_key`'s (no limits) and live.api_keys."""
    out: list[tuple[str, KeyPolicy]] = []
    single = resolve_api_key(scenario, explicit)
    if single:
        out.append((single, UNLIMITED))
    live = scenario.spec.live
    for i, k in enumerate(live.api_keys if live is not None else ()):
        out.append((k.key.get_secret_value(), KeyPolicy(
            k.name or f"api_keys.{i}", frozenset(k.slo_classes) if k.slo_classes is not None else None,
            k.min_ttft_s, k.default_slo_class)))
    return out


def scenario_secrets(scenario: Scenario, extra: Iterable[str | None] = ()) -> list[str]:
    """Secret values in a scenario: the Gurobi licence settings and the API key (plus `extra`)."""
    out: list[str] = []
    gurobi = scenario.spec.scheduler.gurobi or {}
    out.extend(str(v) for v in gurobi.values())
    live = scenario.spec.live
    if live is not None and live.api_key is not None:
        out.append(live.api_key.get_secret_value())
    if live is not None:
        out.extend(k.key.get_secret_value() for k in live.api_keys)
    out.extend(v for v in extra if v)
    return sorted({s for s in out if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks secret values in log records (message and arguments) that pass through it."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            clean = redact(msg, self.secrets)
            if clean != msg:
                record.msg, record.args = clean, None
        return True
