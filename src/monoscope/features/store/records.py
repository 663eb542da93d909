"""What the feature database returns: a feature's record, examples, labels, logit effects and neighbours."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Example:
    """One stored excerpt: a window of a context around the feature's strongest activation in it."""

    feature_id: int
    kind: str  # 'top' | 'quantile' | 'random'
    rank: int
    tokens: list[str]
    activations: list[float]
    text: str
    token_ids: list[int]
    context: int  # index of the context in the analysed stream
    start: int  # position of tokens[0] in the context (position 0 is BOS)
    peak: int  # index into tokens of the strongest activation (random examples: the window's centre)
    max_activation: float
    bin: int | None = None  # quantile bin, 0 = lowest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Label:
    id: int
    feature_id: int
    source: str
    text: str
    detection: float | None
    fuzzing: float | None
    embedding_score: float | None
    created: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenEffect:
    token: str
    token_id: int
    value: float


@dataclass
class Neighbour:
    id: int
    cosine: float
    label: str | None


@dataclass
class FeatureRecord:
    """A feature's statistics and its shown label."""

    id: int
    n_active: int
    n_contexts: int
    density: float
    mean_activation: float | None  # mean over the tokens it fires on
    max_activation: float
    std_activation: float  # standard deviation over all analysed tokens (zeros included)
    label: str | None
    label_source: str | None
    x: float | None = None
    y: float | None = None

    @property
    def dead(self) -> bool:
        return self.n_active == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
