"""`qlmctl schema`: the JSON schema of a scenario (or sweep, or profile) file, for editors and validators."""

from __future__ import annotations

import json
from typing import Optional

import typer

from qlmctl.commands.common import fail

KINDS = ("scenario", "sweep", "profile")


def schema(
    kind: str = typer.Argument("scenario", help="Which file: scenario, sweep or profile."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write it to this file instead of printing it."),
) -> None:
    """Print the JSON schema of a scenario file (or of a sweep file, or an engine profile file): every field,
    its type, default and description, as the loader validates them. Editors with YAML language servers
    take it: `# yaml-language-server: $schema=scenario.schema.json` at the top of a scenario."""
    from qlmctl.errors import UserError

    if kind not in KINDS:
        fail(UserError(f"unknown kind '{kind}'; choose from {', '.join(KINDS)}", field="KIND"))
    if kind == "scenario":
        from qlmctl.scenario import ScenarioSpec as model
    elif kind == "sweep":
        from qlmctl.sweep.spec import SweepSpec as model  # type: ignore[assignment]
    else:
        from qlmctl.scenario import ProfileSpec as model  # type: ignore[assignment]
    data = model.model_json_schema()
    data = {"$schema": "https://json-schema.org/draft/2020-12/schema", **data, "title": f"qlmctl {kind} file"}
    text = json.dumps(data, indent=2, default=str) + "\n"
    if out:
        from pathlib import Path

        Path(out).write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
