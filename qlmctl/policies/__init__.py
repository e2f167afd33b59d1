"""Scheduling policies, built by name through `make_policy`.

`POLICIES` is the one registry: a policy's name and the `module:Class` that implements it. Adding a
policy is one new module (a `Policy` subclass whose `name` is its key here) plus one line in
`POLICIES`. Modules are imported on first use, so a command that runs `fcfs` never loads the MILP
solvers that `qlm-lp` needs. An explicit table rather than self-registration on import: the list of
names needs no imports, and nothing depends on which modules happen to have been imported.

A new policy is developed in an editable (pure Python) install: in the compiled build of a regular install
(setup.py), an interpreted class cannot derive from the compiled ones (`QueuePolicy`, `QLMPolicy`, ...); one
deriving from `Policy` itself works in both. A module added to setup.py's COMPILED list is compiled with the rest.
"""

from __future__ import annotations

import importlib

from qlmctl.errors import UserError
from qlmctl.policies.base import Policy, PolicyContext

POLICIES: dict[str, str] = {
    "fcfs": "qlmctl.policies.baselines:FCFSPolicy",
    "priority": "qlmctl.policies.baselines:PriorityPolicy",
    "edf": "qlmctl.policies.baselines:EDFPolicy",
    "qlm": "qlmctl.policies.qlm:QLMPolicy",
    "qlm-strict": "qlmctl.policies.qlm:QLMStrictPolicy",
    "qlm-basic": "qlmctl.policies.qlm_basic:QLMBasicPolicy",
    "qlm-lp": "qlmctl.policies.qlm_lp:QLMLPPolicy",
    "shepherd": "qlmctl.policies.shepherd:ShepherdPolicy",
    "sjf-oracle": "qlmctl.policies.sjf:SJFOraclePolicy",
    "direct": "qlmctl.policies.direct:DirectPolicy",
}
"""Policy name -> "module:Class"; the order is the order `qlmctl policies` and `evaluate` show them in."""


def policy_names() -> list[str]:
    """Every policy's name, without importing any policy module."""
    return list(POLICIES)


def policy_class(name: str) -> type[Policy]:
    """The class implementing policy `name` (its module imported now if it was not yet).

    Raises:
        UserError: `name` is not a policy; the message lists the choices.
    """
    try:
        target = POLICIES[name]
    except KeyError:
        raise UserError(f"unknown policy '{name}'; choose from {', '.join(POLICIES)}", field="policy") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def policy_doc(cls: type) -> str:
    """`cls`'s docstring. A class compiled by the optional mypyc build (setup.py) keeps none at run time, so it is
    read from the module's source, installed beside it."""
    if cls.__doc__:
        return cls.__doc__
    import ast
    import sys
    from pathlib import Path

    path = Path(getattr(sys.modules.get(cls.__module__), "__file__", "") or "")
    source = path.with_name(path.name.split(".")[0] + ".py")
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return ast.get_docstring(node) or ""
    return ""


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    return policy_class(name)(ctx)


def parse_policy_list(text: str) -> list[str]:
    """Policy names from a comma-separated list ("fcfs, qlm"), each checked.

    Raises:
        UserError: a name is not a policy; the message lists the choices.
    """
    names = [p.strip() for p in text.split(",") if p.strip()]
    for n in names:
        policy_class(n)
    return names


__all__ = ["POLICIES", "Policy", "PolicyContext", "make_policy", "parse_policy_list", "policy_class",
           "policy_names"]
