"""Auto-interp, the stage after the feature database: an LLM explains SAE features from their stored examples,
judge LLMs score the labels on held-out examples, and the labels go back into the database.

    from monoscope.autointerp import LLMClient, explain_features
    from monoscope.features import FeatureStore

    client = LLMClient(base_url="http://localhost:8000/v1", model="my-model")
    run = explain_features(FeatureStore.for_sae("runs/sae"), range(100), client)   # labels "llm:<model>"

Modules: `examples` (how excerpts are read from the store and shown to an LLM), `explainer`, `scorers`
(detection, fuzzing), `client` (over the `openai` package), `run` (a store end to end), `cli`
(`monoscope explain`). It reads and writes the feature store; `monoscope.features` never imports it.
See docs/explain.md. Names are imported lazily, so the CLI's argument parsing stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Example": "examples",
    "ExampleSplit": "examples",
    "split_examples": "examples",
    "ExplainConfig": "config",
    "LLMClient": "client",
    "LLMError": "client",
    "BudgetExceeded": "client",
    "Usage": "client",
    "ChatResult": "client",
    "Explanation": "explainer",
    "ExplanationError": "explainer",
    "explain_examples": "explainer",
    "ScoreResult": "scorers",
    "score_detection": "scorers",
    "score_fuzzing": "scorers",
    "LabelResult": "run",
    "LabelRun": "run",
    "LabelStore": "run",
    "explain_feature": "run",
    "explain_features": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monoscope.autointerp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
