"""User-facing errors: bad input is reported as one line naming file, line and field."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input, printed without a traceback.

    Args:
        message: What is wrong, in plain words.
        path: The file holding the bad input, if any.
        line: 1-based line (or row) number in that file, if known.
        field: The field (column, key path) at fault, if known.
    """

    def __init__(
        self,
        message: str,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.path:
            where = self.path
            if self.line is not None:
                where += f":{self.line}"
        parts = [p for p in (where, f"field '{self.field}'" if self.field else "") if p]
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message
