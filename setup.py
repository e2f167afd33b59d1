"""Optional compiled build: `QLMCTL_COMPILE=1` compiles the simulator's hot modules with mypyc (about twice as fast,
docs/benchmarks.md). Everything else is in pyproject.toml; without the variable this adds nothing.

    pip install mypy setuptools wheel
    QLMCTL_COMPILE=1 pip install --no-build-isolation .

A regular install only: in an editable one the compiled modules would sit beside their sources and shadow every
later edit of them.
"""

import os
import sys

from setuptools import setup

COMPILED = [
    "simulator/engine.py", "simulator/prefix.py", "simulator/profile.py", "simulator/api_server.py",
    "qlmctl/backends/sim.py", "qlmctl/core/request.py", "qlmctl/core/groups.py", "qlmctl/core/driver.py",
    "qlmctl/core/calibration.py", "qlmctl/core/estimator.py",
    "qlmctl/policies/common.py", "qlmctl/policies/baselines.py", "qlmctl/policies/sjf.py",
    "qlmctl/policies/qlm_basic.py", "qlmctl/policies/qlm.py", "qlmctl/policies/qlm_lp.py",
]
"""The event loop, the engine, the policies it calls on every event, and the request and group records they all
read (a compiled class's attributes are read from other compiled code directly, an interpreted one's through a
lookup). A compiled class cannot be subclassed by an interpreted one, so the policies derived from these are
compiled too."""


def ext_modules() -> list:
    if os.environ.get("QLMCTL_COMPILE", "") in ("", "0"):
        return []
    if any(a in ("editable_wheel", "develop") for a in sys.argv):
        sys.exit("QLMCTL_COMPILE=1 needs a regular install (pip install --no-build-isolation .), not an editable one: "
                 "the compiled modules would shadow later edits of their sources")
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("QLMCTL_COMPILE=1 needs mypy in the build environment: pip install mypy setuptools wheel, then "
                 "QLMCTL_COMPILE=1 pip install --no-build-isolation .")
    # Imports outside the compiled set are followed for their types only (their own errors are not this build's),
    # and the dependencies need not be installed in the build environment.
    return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED], opt_level="3")


if __name__ == "__main__":  # (as setuptools runs it; tests import it for `ext_modules`)
    setup(ext_modules=ext_modules())
