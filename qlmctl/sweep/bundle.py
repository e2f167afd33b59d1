"""A scenario packed with the files it names, so that any worker (a local process or a Ray node
that never saw this machine's disk) runs exactly what the driver validated.

The bundle holds the validated scenario as YAML, with every file it references (engine profiles,
the trace, the lengths trace of a synthetic workload) copied in and renamed to a local name. Its
digest covers all of it, so a cached result is reused only while none of those bytes changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlmctl.errors import UserError
from qlmctl.scenario import Scenario

SCENARIO_FILE = "scenario.yaml"
_COMPLETE = ".complete"


@dataclass(frozen=True)
class Bundle:
    """A self-contained scenario: its YAML and the bytes of the files it references."""

    digest: str
    """sha256 (hex, 16 chars) over the YAML and every file's name and bytes."""
    scenario_yaml: str
    files: dict[str, bytes] = field(repr=False)
    """Local file name -> content."""
    origins: dict[str, str]
    """Local file name -> the path it was read from (to name it in errors); `SCENARIO_FILE`
    maps to the scenario file."""


def _read(scenario: Scenario, ref: str, where: str) -> tuple[Path, bytes]:
    path = scenario.resolve_path(ref)
    try:
        return path, path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}", scenario.path, field=where) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}", scenario.path, field=where) from None


def make_bundle(scenario: Scenario) -> Bundle:
    """Pack `scenario` (already validated, sweep overrides applied) with the files it names.

    Raises:
        UserError: a referenced file is missing or unreadable (naming the scenario and field).
    """
    data: dict[str, Any] = scenario.spec.model_dump(mode="json")
    files: dict[str, bytes] = {}
    origins: dict[str, str] = {}

    def pack(ref: str, where: str) -> str:
        path, content = _read(scenario, ref, where)
        # Named by position, not by the original name: renaming or moving a file keeps its
        # cached results; errors name the original through `origins`.
        name = f"file{len(files)}{path.suffix}"
        files[name], origins[name] = content, str(path)
        return name

    for model, spec in data["models"].items():
        if spec.get("profile_file"):
            spec["profile_file"] = pack(spec["profile_file"], f"models.{model}.profile_file")
    workload = data["workload"]
    if workload.get("trace"):
        workload["trace"] = pack(workload["trace"], "workload.trace")
    synthetic = workload.get("synthetic") or {}
    if synthetic.get("lengths_from"):
        synthetic["lengths_from"] = pack(synthetic["lengths_from"], "workload.synthetic.lengths_from")
    for cls, lengths in (workload.get("lengths_by_class") or {}).items():
        if lengths.get("lengths_from"):
            lengths["lengths_from"] = pack(lengths["lengths_from"], f"workload.lengths_by_class.{cls}.lengths_from")

    origins[SCENARIO_FILE] = str(scenario.path) if scenario.path is not None else SCENARIO_FILE
    # Key order is meaning (the SLO-class split draws in it), so it is kept as validated.
    text = yaml.safe_dump(data, sort_keys=False)
    h = hashlib.sha256(text.encode())
    for name in sorted(files):
        h.update(b"\0" + name.encode() + b"\0")
        h.update(files[name])
    return Bundle(h.hexdigest()[:16], text, files, origins)


def materialise(bundle: Bundle, root: Path | None = None) -> Path:
    """Write `bundle` under `root/<digest>/` once and return its scenario file.

    Safe when several processes of one machine race: each writes a private folder and renames it
    into place; the loser drops its copy. The default root is a per-user folder in the temp dir.
    """
    root = root or Path(tempfile.gettempdir()) / f"qlmctl-sweep-{os.getuid() if hasattr(os, 'getuid') else 0}"
    final = root / bundle.digest
    if (final / _COMPLETE).exists():
        return final / SCENARIO_FILE
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle.digest}-", dir=root))
    try:
        (tmp / SCENARIO_FILE).write_text(bundle.scenario_yaml)
        for name, content in bundle.files.items():
            (tmp / name).write_bytes(content)
        (tmp / _COMPLETE).touch()
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _COMPLETE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / SCENARIO_FILE


def original_path(local: str | None, folder: Path, origins: dict[str, str]) -> str | None:
    """The path a bundled file was read from, for a path inside the materialised `folder`."""
    if local is None:
        return None
    p = Path(local)
    if p.parent == folder and p.name in origins:
        return origins[p.name]
    return local


def with_origins(text: str, folder: Path, origins: dict[str, str]) -> str:
    """`text` (an error message) with the bundle's local paths replaced by the original ones."""
    for name in sorted(origins, key=len, reverse=True):
        text = text.replace(str(folder / name), origins[name])
    return text
