"""The policy registry: one table of names, each imported lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qlmctl.errors import UserError
from qlmctl.policies import POLICIES, Policy, policy_class, policy_names

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_every_policy_name_resolves_to_its_class():
    assert policy_names() == ["fcfs", "priority", "edf", "qlm", "qlm-lp", "shepherd", "sjf-oracle"]
    for name in policy_names():
        cls = policy_class(name)
        assert issubclass(cls, Policy) and cls.name == name, (name, cls)
        assert POLICIES[name] == f"{cls.__module__}:{cls.__qualname__}"


def test_unknown_policy_is_a_user_error_naming_the_choices():
    with pytest.raises(UserError) as info:
        policy_class("fifo")
    assert info.value.field == "policy"
    assert "unknown policy 'fifo'" in info.value.message
    assert all(n in info.value.message for n in policy_names())


def test_policy_modules_load_only_when_used():
    res = _python(
        "import sys\n"
        "from qlmctl.policies import policy_class, policy_names\n"
        "names = policy_names()\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith(('qlmctl.policies.', 'qlmctl.solvers')))\n"
        "print(loaded())\n"
        "policy_class('fcfs')\n"
        "print(loaded())\n"
    )
    assert res.returncode == 0, res.stderr
    before, after = res.stdout.splitlines()
    assert before == "['qlmctl.policies.base']"
    assert "qlmctl.policies.baselines" in after and "qlm_lp" not in after and "qlmctl.solvers" not in after
