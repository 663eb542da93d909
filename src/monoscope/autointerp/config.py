"""How auto-interp runs: the examples each step uses, how they are shown, and how much the LLM may write."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import JsonConfig, require


@dataclass
class ExplainConfig(JsonConfig):
    """How many examples each step uses, how they are shown, and how much the LLM may write."""

    n_top: int = 10  # top-activating excerpts shown to the explainer
    n_quantile: int = 5  # quantile-sampled excerpts shown to the explainer
    n_held_out: int = 10  # held-out firing excerpts for scoring
    n_non_activating: int = 10  # held-out non-firing excerpts for detection
    context: int = 64  # tokens per excerpt (a window around the strongest activation)
    batch_size: int = 5  # excerpts per judge prompt
    explain_max_tokens: int = 400
    judge_max_tokens: int = 200
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_top", "n_held_out", "context", "batch_size", "explain_max_tokens", "judge_max_tokens"):
            value = getattr(self, name)
            require(int(value) >= 1, f"ExplainConfig.{name} must be at least 1, got {value}")
        for name in ("n_quantile", "n_non_activating"):
            value = getattr(self, name)
            require(int(value) >= 0, f"ExplainConfig.{name} cannot be negative, got {value}")
        require(self.temperature >= 0, f"ExplainConfig.temperature cannot be negative, got {self.temperature}")

    def feature_seed(self, feature_id: int) -> int:
        """The seed of one feature's example split and judge shuffles."""
        return self.seed * 1_000_003 + feature_id
