"""The CLI's commands, one module each; every module exposes `register(app: typer.Typer)`.

`qlmctl.cli` registers them in this order (the order `qlmctl --help` lists them in). A module here that
does not import is an error, not a command silently left out. Heavy imports (solvers, HTTP servers,
matplotlib) stay inside the command functions, so they load only when their command runs. What the
modules share lives in `qlmctl.commands.common`.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "qlmctl.commands.simulate",
    "qlmctl.commands.policies",
    "qlmctl.commands.serve",
    "qlmctl.commands.emulate",
    "qlmctl.commands.replay",
    "qlmctl.commands.profile",
    "qlmctl.commands.plot",
    "qlmctl.commands.compare",
    "qlmctl.commands.evaluate",
    "qlmctl.commands.sweep",
    "qlmctl.commands.schema",
)
