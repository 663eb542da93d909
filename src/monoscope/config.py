"""Base for dataclass configs: validated on construction, serialised to and from JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, TypeVar

from ._io import atomic_write_json, read_json
from .errors import MonoscopeError

C = TypeVar("C", bound="JsonConfig")


@dataclasses.dataclass
class JsonConfig:
    """Subclasses are dataclasses whose fields are JSON values; they check themselves in `__post_init__`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MonoscopeError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**dict(data))

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_json(path))


def require(condition: bool, message: str) -> None:
    """Config validation: raise a user-facing error when `condition` is false."""
    if not condition:
        raise MonoscopeError(message)
