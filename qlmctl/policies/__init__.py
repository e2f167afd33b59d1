"""Scheduling policies, built by name through `make_policy`."""

from __future__ import annotations

from enum import Enum

from qlmctl.errors import UserError
from qlmctl.policies.base import Policy, PolicyContext
from qlmctl.policies.baselines import EDFPolicy, FCFSPolicy, PriorityPolicy
from qlmctl.policies.qlm import QLMPolicy


class PolicyName(str, Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"
    EDF = "edf"
    QLM = "qlm"


_REGISTRY: dict[str, type[Policy]] = {
    PolicyName.FCFS.value: FCFSPolicy,
    PolicyName.PRIORITY.value: PriorityPolicy,
    PolicyName.EDF.value: EDFPolicy,
    PolicyName.QLM.value: QLMPolicy,
}


def register(name: str, cls: type[Policy]) -> None:
    """Add a policy (other modules register theirs on import)."""
    _REGISTRY[name] = cls


def policy_names() -> list[str]:
    _load_optional()
    return list(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    _load_optional()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown policy '{name}'; choose from {', '.join(_REGISTRY)}", field="policy") from None


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    return policy_class(name)(ctx)


def _load_optional() -> None:
    """Import policy modules that register themselves (kept lazy: some pull in solvers)."""
    import importlib

    for mod in ("qlmctl.policies.qlm_lp", "qlmctl.policies.shepherd", "qlmctl.policies.sjf"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


__all__ = ["Policy", "PolicyContext", "PolicyName", "make_policy", "policy_names", "policy_class", "register"]
