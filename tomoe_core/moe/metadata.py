"""tomoe.json, a conversion's metadata: one typed record that owns the file name. Standard library only.

Every folder a conversion makes (converted, shipped recipe, export) holds one tomoe.json. The engine
reads a few keys with meaning (the dense model, the budget and its range, the anchor gaps, the
format and the weights' checksum); the rest (settings, accounting, statistics) is carried as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_json

METADATA_FILE = "tomoe.json"


class ConvertedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ConversionMetadata:
    fields: dict = field(default_factory=dict)  # the whole JSON object

    @staticmethod
    def path(folder: str | Path) -> Path:
        return Path(folder) / METADATA_FILE

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return cls.path(folder).is_file()

    @classmethod
    def read(cls, folder: str | Path) -> "ConversionMetadata":
        path = cls.path(folder)
        if not path.exists():
            raise ConvertedModelError(f"{folder} is not a converted ToMoE model (no {METADATA_FILE}); "
                                      "create one with `python -m tomoe_core convert`")
        try:
            return cls(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConvertedModelError(f"{path} is corrupt ({err}); re-run the conversion") from None

    def write(self, folder: str | Path) -> Path:
        """Write the record atomically into `folder`; returns the file."""
        atomic_write_json(self.path(folder), self.fields)
        return self.path(folder)

    @property
    def model(self) -> str | None:  # the dense model it was made from (name or path)
        return self.fields.get("model") or None

    @property
    def budget(self) -> float | None:  # fraction of MLP parameters active per token
        return self.fields.get("budget")

    @property
    def budget_range(self) -> tuple[float, float] | None:  # a budget-conditioned conversion's range
        rng = self.fields.get("budget_range") or (self.fields.get("settings") or {}).get("budget_range")
        return tuple(rng) if rng else None

    @property
    def anchor_gaps(self) -> dict | None:  # budget -> gap chosen by the anchor calibration
        return self.fields.get("anchor_gaps")

    @property
    def format_version(self) -> int | None:
        return self.fields.get("format_version")

    @property
    def weights_sha256(self) -> str | None:
        return self.fields.get("weights_sha256")

    def dense_model(self, folder: str | Path) -> str:
        """The dense model, or a one-line error naming the folder and the fix when tomoe.json has none."""
        if not self.model:
            raise ConvertedModelError(f"{self.path(folder)} names no dense model (key 'model'); pass the "
                                      "model it was converted from, e.g. `evaluate FOLDER --model NAME_OR_PATH`")
        return str(self.model)
