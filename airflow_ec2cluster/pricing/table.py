"""The on-demand price table: one JSON file in the provider (``data/on_demand_prices.json``), with its date.

``{"as_of": "2026-12-03", "source": ..., "currency": "USD", "unit": "instance-hour",
"regions": {"us-east-1": {"m5.large": 0.096, ...}}}``: Linux, shared tenancy, no pre-installed software,
capacity status Used, on-demand, per instance-hour. ``ec2cluster refresh-prices`` rewrites it from the AWS
Price List API (:mod:`airflow_ec2cluster.pricing.price_list`); a type or region it lacks has no price (the
cost estimate says so, never 0).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "on_demand_prices.json"


@dataclass(frozen=True)
class PriceTable:
    as_of: str
    source: str
    regions: Mapping[str, Mapping[str, float]]

    def for_region(self, region: str | None) -> dict[str, float]:
        """Instance type -> USD per hour on-demand in ``region`` (empty when the table lacks it)."""
        return dict(self.regions.get(region or "", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of,
            "source": self.source,
            "currency": "USD",
            "unit": "instance-hour",
            "regions": {r: dict(sorted(p.items())) for r, p in sorted(self.regions.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriceTable:
        regions = {
            str(region): {str(t): float(p) for t, p in dict(prices).items()}
            for region, prices in dict(data.get("regions") or {}).items()
        }
        return cls(
            as_of=str(data.get("as_of") or "unknown"), source=str(data.get("source") or ""), regions=regions
        )


def read_table(path: Path | str = TABLE_PATH) -> PriceTable:
    return PriceTable.from_dict(json.loads(Path(path).read_text()))


@functools.lru_cache(maxsize=1)
def on_demand_table() -> PriceTable:
    """The provider's table, read once per process."""
    return read_table(TABLE_PATH)


def write_table(table: PriceTable, path: Path | str = TABLE_PATH) -> None:
    """Replace the file atomically (a reader never sees half a table)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(table.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
