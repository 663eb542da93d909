"""What an export wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportReport:
    folder: Path
    features: int
    activations: int  # activation examples (Neuronpedia) or example rows (Parquet)
    explanations: int  # explanations (Neuronpedia) or label rows (Parquet)
    files: int

    def to_dict(self) -> dict[str, str | int]:
        return {
            "folder": str(self.folder),
            "features": self.features,
            "activations": self.activations,
            "explanations": self.explanations,
            "files": self.files,
        }
