"""A benchmark's outcome: rows of figures beside their reference and target, as a table or one JSON object."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    """One measured figure; ``met`` is None where there is no target."""

    what: str
    value: Any
    reference: Any = None
    target: str = ""
    met: bool | None = None


@dataclass
class Result:
    name: str
    size: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, what: str, value: Any, reference: Any = None, target: str = "", met: bool | None = None):
        self.rows.append(Row(what, value, reference, target, met))

    @property
    def met(self) -> bool:
        return all(row.met is not False for row in self.rows)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "met": self.met}, default=str, sort_keys=True)

    def table(self) -> str:
        header = ("figure", "measured", "reference", "target", "met")
        lines = [
            (
                row.what,
                fmt(row.value),
                fmt(row.reference),
                row.target,
                {True: "yes", False: "NO"}.get(row.met, "-"),
            )
            for row in self.rows
        ]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
        out = [f"== {self.name} (size {self.size}, {self.seconds:.1f} s) =="]
        for cells in (header, *lines):
            out.append(
                "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
            )
        for key, value in self.details.items():
            out.append(f"  {key}: {fmt(value)}")
        return "\n".join(out)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
