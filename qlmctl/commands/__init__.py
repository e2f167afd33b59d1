"""CLI commands beyond `simulate`, one module each; every module exposes `register(app: typer.Typer)`.

Kept as separate modules so that heavy imports (solvers, HTTP servers, matplotlib) load only when the
command runs.
"""

COMMAND_MODULES = (
    "qlmctl.commands.serve",
    "qlmctl.commands.emulate",
    "qlmctl.commands.replay",
    "qlmctl.commands.profile",
    "qlmctl.commands.validate",
    "qlmctl.commands.plot",
    "qlmctl.commands.evaluate",
    "qlmctl.commands.sweep",
)
