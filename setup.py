"""The build. A regular install (`pip install .`) compiles the simulator's hot modules with mypyc, 2-3 times faster
(docs/benchmarks.md); an editable one (`pip install -e .`) stays pure Python, since compiled modules beside their
sources would shadow every later edit of them. Everything else is in pyproject.toml.

QLMCTL_COMPILE (environment, at install time):
    unset   compile where this machine can (a C compiler and Python's headers); else pure Python, with a warning
    0       pure Python
    1       compile, and fail the install where that cannot be done
QLMCTL_OPT_LEVEL: mypyc's (and the C compiler's) optimisation level, 0-3 (default 3; the tests build at 0, faster)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "simulator/engine.py", "simulator/prefix.py", "simulator/profile.py", "simulator/api_server.py",
    "qlmctl/backends/sim.py", "qlmctl/core/request.py", "qlmctl/core/groups.py", "qlmctl/core/driver.py",
    "qlmctl/core/calibration.py", "qlmctl/core/estimator.py", "qlmctl/core/cluster.py",
    "qlmctl/policies/common.py", "qlmctl/policies/baselines.py", "qlmctl/policies/sjf.py",
    "qlmctl/policies/qlm_basic.py", "qlmctl/policies/qlm.py", "qlmctl/policies/qlm_lp.py",
]
"""The event loop, the engine, the policies it calls on every event, and the request and group records they all
read (a compiled class's attributes are read from other compiled code directly, an interpreted one's through a
lookup). A compiled class cannot be subclassed by an interpreted one, so the policies derived from these are
compiled too."""

BUILDS = ("bdist_wheel", "build", "build_ext", "install")
"""setup.py commands that build the package; the others (egg_info, dist_info, sdist: pip's metadata steps) only
describe it, and compiling there would run mypy's type check once more for nothing."""


def _mode() -> str:
    mode = os.environ.get("QLMCTL_COMPILE", "")
    if mode not in ("", "0", "1"):
        sys.exit(f"QLMCTL_COMPILE={mode!r}: expected unset (compile where possible), 0 (pure) or 1 (compiled)")
    return {"": "auto", "0": "pure", "1": "required"}[mode]


def _pure(reason: str) -> list:
    """No compiled modules, for `reason`; an error where QLMCTL_COMPILE=1 asked for them."""
    if _mode() == "required":
        sys.exit(f"QLMCTL_COMPILE=1: {reason}")
    print(f"qlmctl: installing pure Python (the simulator 2-3x slower): {reason}", file=sys.stderr)
    return []


def ext_modules() -> list:
    if _mode() == "pure":
        return []
    if any(a in ("editable_wheel", "develop") for a in sys.argv):
        if _mode() == "required":
            sys.exit("QLMCTL_COMPILE=1 needs a regular install (pip install .), not an editable one: the compiled "
                     "modules would shadow later edits of their sources")
        return []
    if not any(a in BUILDS for a in sys.argv):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return _pure("mypy is not in the build environment (pyproject.toml's build-system requires it; with "
                     "--no-build-isolation, pip install mypy first)")
    try:
        # Imports outside the compiled set are followed for their types only (their own errors are not this
        # build's), and the dependencies need not be installed in the build environment.
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED],
                        opt_level=os.environ.get("QLMCTL_OPT_LEVEL", "3"))
    except (Exception, SystemExit) as e:  # mypy's type check exits on an error
        return _pure(f"mypyc could not translate the sources ({e})")


def build_in_place(src: Path, dst: Path, opt_level: str = "3") -> subprocess.CompletedProcess:
    """The checkout `src`'s sources (qlmctl/, simulator/, its setup.py) copied to `dst`, unless they are one, and
    compiled there in place (`setup.py build_ext --inplace`, QLMCTL_COMPILE=1): the compiled build without an
    install, for the test that checks it against the pure one and for `bench_simulate.py --build compiled`."""
    if Path(src).resolve() != Path(dst).resolve():
        for part in ("qlmctl", "simulator"):
            shutil.copytree(Path(src) / part, Path(dst) / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy(Path(src) / "setup.py", dst)
    env = {**os.environ, "QLMCTL_COMPILE": "1", "QLMCTL_OPT_LEVEL": opt_level}
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dst, env=env,
                          capture_output=True, text=True)


class OptionalBuildExt(build_ext):
    """build_ext that, where the C compiler fails (none installed, no Python headers), leaves nothing compiled
    behind: mypyc's per-module stubs import one shared library, so a partial build would break the package."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:
            if _mode() == "required":
                raise
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []
            _pure(f"the C build failed ({type(e).__name__}: {e})")


if __name__ == "__main__":  # (as setuptools runs it; tests import it for `ext_modules`)
    setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
