"""setup.py's compiled build: on for a regular install where the machine can build it, never for an editable one
(it would shadow the sources), and the same decisions as the pure build."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from qlmctl.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _setup_module() -> dict:
    return runpy.run_path(str(REPO / "setup.py"), run_name="setup_under_test")


@pytest.mark.parametrize("argv, mode", [
    (["setup.py", "egg_info"], None),  # pip's metadata steps: nothing to build there
    (["setup.py", "dist_info"], None),
    (["setup.py", "editable_wheel"], None),  # pip install -e: the sources must stay what runs
    (["setup.py", "bdist_wheel"], "0"),  # asked for pure Python
])
def test_no_compiled_modules_where_none_belong(monkeypatch, argv, mode):
    monkeypatch.setattr(sys, "argv", argv)
    if mode is None:
        monkeypatch.delenv("QLMCTL_COMPILE", raising=False)
    else:
        monkeypatch.setenv("QLMCTL_COMPILE", mode)
    assert _setup_module()["ext_modules"]() == []


def test_a_compiled_editable_install_is_refused(monkeypatch):
    monkeypatch.setenv("QLMCTL_COMPILE", "1")
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel"])
    with pytest.raises(SystemExit, match="not an editable one"):
        _setup_module()["ext_modules"]()


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv("QLMCTL_COMPILE", "yes")
    with pytest.raises(SystemExit, match="QLMCTL_COMPILE='yes'"):
        _setup_module()["ext_modules"]()


def test_without_mypyc_a_regular_install_is_pure_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    monkeypatch.setitem(sys.modules, "mypyc.build", None)  # import fails
    monkeypatch.delenv("QLMCTL_COMPILE", raising=False)
    assert _setup_module()["ext_modules"]() == []
    assert "installing pure Python" in capsys.readouterr().err
    monkeypatch.setenv("QLMCTL_COMPILE", "1")  # asked for: an error instead
    with pytest.raises(SystemExit, match="mypy is not in the build environment"):
        _setup_module()["ext_modules"]()


def test_the_compiled_modules_exist_and_hold_the_event_loop():
    mods = _setup_module()["COMPILED"]
    assert all((REPO / m).is_file() for m in mods)
    assert {"simulator/engine.py", "qlmctl/backends/sim.py", "qlmctl/policies/qlm.py"} <= set(mods)


def _can_compile() -> str | None:
    """Why this machine cannot build the compiled modules, or None."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers (Python.h)"
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return "mypy is not installed (the test extras install it)"
    return None


DIGEST = r"""
import hashlib, pickle, sys
import simulator
from simulator.prefix import PromptBlocks
from simulator.profile import EngineProfile
from qlmctl.runner import simulate
from qlmctl.scenario import load_scenario
from qlmctl.workload import build_requests
print(simulator.build())
for scenario, policy, cap in [("default", "fcfs", 600), ("default", "priority", 600), ("default", "edf", 600),
                              ("default", "qlm", 600), ("default", "shepherd", 600), ("multi_model", "qlm", 400),
                              ("multi_model", "fcfs", 400), ("prefill_bound", "qlm-strict", 400), ("tpot", "qlm", 300)]:
    over = {"workload": {"max_requests": cap}}
    if scenario == "tpot":  # its lengths come from the full trace outside the repository: the bundled slice here
        over["workload"]["synthetic"] = {"lengths_from": f"{sys.argv[1]}/traces/azure_conv_2023_first3000.csv"}
    sc = load_scenario(f"{sys.argv[1]}/scenarios/{scenario}.yaml", over)
    reqs, _ = build_requests(sc)
    run = simulate(sc, policy, reqs)
    h = hashlib.sha256()
    for r in sorted(run.result.requests, key=lambda r: r.request_id):
        h.update(repr((r.request_id, r.instance_id, r.dispatch_s, r.first_token_s, r.finish_s, r.num_preemptions,
                       r.num_evictions)).encode())
    print(scenario, policy, h.hexdigest()[:16], run.summary["slo_attainment"])
# Sweeps hand profiles and prompts to worker processes: frozen records pickle the same in both builds.
records = [EngineProfile.from_token_throughput("m", 2000.0, knee_tokens=64), PromptBlocks(16, (3, 5, 8))]
print([pickle.loads(pickle.dumps(x)) == x for x in records])
"""


def test_the_compiled_build_decides_as_the_pure_one(tmp_path):
    """Build the compiled modules as a regular install does (a copy of the sources, so this checkout stays pure),
    then replay bundled scenarios under several policies with each build: every request's placement and timing
    must be the same to the last bit."""
    why = _can_compile()
    if why:
        pytest.skip(f"cannot build the compiled modules here: {why}")
    build = _setup_module()["build_in_place"](REPO, tmp_path, opt_level="0")  # -O0: the same code, built faster
    assert build.returncode == 0, build.stderr[-3000:]

    def digest(root: Path) -> list[str]:
        out = subprocess.run([sys.executable, "-c", DIGEST, str(REPO)], cwd=tmp_path.parent, text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": str(root)})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.splitlines()

    compiled, pure = digest(tmp_path), digest(REPO)
    assert compiled[0] == "compiled" and pure[0] == "pure"
    assert compiled[1:] == pure[1:]
    assert len(pure) == 11 and pure[-1] == "[True, True]"


def test_a_regular_install_finds_the_checkout_it_runs_in(tmp_path, monkeypatch):
    """Installed into site-packages, the package has no scenarios/ beside it: the defaults come from the checkout
    the command runs in, and outside any checkout the error says what to do."""
    import qlmctl.scenario as S

    site = tmp_path / "site-packages" / "qlmctl"
    site.mkdir(parents=True)
    monkeypatch.setattr(S, "__file__", str(site / "scenario.py"))
    checkout = tmp_path / "checkout"
    (checkout / "scenarios").mkdir(parents=True)
    (checkout / "scenarios" / "default.yaml").write_text("name: x\n")
    (checkout / "traces").mkdir()
    monkeypatch.chdir(checkout)
    assert S._repo_root() == checkout
    monkeypatch.chdir(checkout / "traces")  # anywhere inside it
    assert S._repo_root() == checkout
    monkeypatch.chdir(tmp_path)
    assert S._repo_root() == tmp_path / "site-packages"
    monkeypatch.setattr(S, "DEFAULT_SCENARIO", tmp_path / "site-packages" / "scenarios" / "default.yaml")
    with pytest.raises(UserError, match="run in a qlmctl checkout"):
        S.load_scenario()
    monkeypatch.setattr(S, "__file__", str(REPO / "qlmctl" / "scenario.py"))  # a source checkout: its own
    assert S._repo_root() == REPO
