"""setup.py's optional compiled build: off unless asked for, refused where it would shadow the sources."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setup_module() -> dict:
    return runpy.run_path(str(REPO / "setup.py"), run_name="setup_under_test")


def test_a_plain_install_compiles_nothing(monkeypatch):
    monkeypatch.delenv("QLMCTL_COMPILE", raising=False)
    assert _setup_module()["ext_modules"]() == []
    monkeypatch.setenv("QLMCTL_COMPILE", "0")
    assert _setup_module()["ext_modules"]() == []


def test_a_compiled_editable_install_is_refused(monkeypatch):
    monkeypatch.setenv("QLMCTL_COMPILE", "1")
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel"])
    with pytest.raises(SystemExit, match="not an editable one"):
        _setup_module()["ext_modules"]()


def test_the_compiled_modules_exist_and_hold_the_event_loop():
    mods = _setup_module()["COMPILED"]
    assert all((REPO / m).is_file() for m in mods)
    assert {"simulator/engine.py", "qlmctl/backends/sim.py", "qlmctl/policies/qlm.py"} <= set(mods)
