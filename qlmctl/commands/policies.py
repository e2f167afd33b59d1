"""`qlmctl policies`: the scheduling policies, one line each."""

from __future__ import annotations

import typer

from qlmctl.commands.common import console


def list_policies() -> None:
    """List the scheduling policies."""
    from qlmctl.policies import policy_class, policy_doc, policy_names

    for n in policy_names():
        doc = policy_doc(policy_class(n)).strip().splitlines()
        console.print(f"[bold]{n}[/]  {doc[0] if doc else ''}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("policies")(list_policies)
