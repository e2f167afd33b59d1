"""Client authentication and secrets of the live gateway.

- API key: with `live.api_key` set in the scenario, or the environment variable QLMCTL_API_KEY, every
  request but GET /health must carry `Authorization: Bearer <key>`; others get 401 with an
  OpenAI-style body. Keys are compared in constant time (`hmac.compare_digest`).
- Secrets never leave the process: the scenario's `scheduler.gurobi` licence settings and the API key
  are masked in `Scenario.dump()` (results folders) and never logged, exported in /metrics or put in
  error messages. `SecretFilter` masks them in log records of the `qlmctl` loggers as a last guard.
- The gateway binds 127.0.0.1 unless told otherwise, and takes engine addresses only from the scenario.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable

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


class APIKeyCheck:
    """Checks `Authorization: Bearer <key>` headers in constant time."""

    def __init__(self, key: str) -> None:
        self._expected = f"Bearer {key}".encode()

    def ok(self, authorization: bytes | None) -> bool:
        return authorization is not None and hmac.compare_digest(authorization, self._expected)


def scenario_secrets(scenario: Scenario, extra: Iterable[str | None] = ()) -> list[str]:
    """Secret values in a scenario: the Gurobi licence settings and the API key (plus `extra`)."""
    out: list[str] = []
    gurobi = scenario.spec.scheduler.gurobi or {}
    out.extend(str(v) for v in gurobi.values())
    live = scenario.spec.live
    if live is not None and live.api_key is not None:
        out.append(live.api_key.get_secret_value())
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
