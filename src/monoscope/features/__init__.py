"""Stage 4: a trained SAE -> a browsable, searchable dictionary of features (the feature database).

    from monoscope.features import analyze_sae, FeatureStore, search_features, scan_text, features_for_examples

    report = analyze_sae("runs/sae")                      # one streaming pass -> runs/sae/features.db
    store = FeatureStore.for_sae("runs/sae")              # read-only
    store.feature(12).label, store.examples(12, "top")[0].text
    search_features(store, "golden gate")                 # words (FTS5 bm25) + meaning (embeddings), fused
    scan_text("The Golden Gate Bridge", sae=sae, loaded=lm, store=store)

See docs/feature-db.md for the analysis pass, the database schema and the numbers.

Names are imported lazily, so `import monoscope.features.<module>` stays cheap (no torch import for the CLI's
argument parsing, none of the analysis code for the explain modules that live here too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and editors
    from .analyze import AnalysisConfig, AnalysisReport, analyze_loaded, analyze_sae, run_pass
    from .embedding import auroc, embed_texts, embedding_score
    from .geometry import feature_map, final_norm, logit_effects, nearest_features
    from .labels import heuristic_labels
    from .loading import open_sae_and_model
    from .scan import ScanResult, scan_text
    from .search import ExampleHit, SearchHit, SearchResults, features_for_examples, search_features
    from .store import SCHEMA_VERSION, Example, FeatureRecord, FeatureStore, Label, default_db_path

_EXPORTS = {
    # analysis
    "AnalysisConfig": "analyze",
    "AnalysisReport": "analyze",
    "analyze_sae": "analyze",
    "analyze_loaded": "analyze",
    "run_pass": "analyze",
    # store
    "FeatureStore": "store",
    "FeatureRecord": "store",
    "Example": "store",
    "Label": "store",
    "SCHEMA_VERSION": "store",
    "default_db_path": "store",
    # search and scan
    "search_features": "search",
    "SearchHit": "search",
    "SearchResults": "search",
    "features_for_examples": "search",
    "ExampleHit": "search",
    "scan_text": "scan",
    "ScanResult": "scan",
    # geometry and labels
    "logit_effects": "geometry",
    "nearest_features": "geometry",
    "feature_map": "geometry",
    "final_norm": "geometry",
    "heuristic_labels": "labels",
    # embeddings
    "embed_texts": "embedding",
    "embedding_score": "embedding",
    "auroc": "embedding",
    # loading
    "open_sae_and_model": "loading",
}

__all__ = [
    "AnalysisConfig",
    "AnalysisReport",
    "Example",
    "ExampleHit",
    "FeatureRecord",
    "FeatureStore",
    "Label",
    "SCHEMA_VERSION",
    "ScanResult",
    "SearchHit",
    "SearchResults",
    "analyze_loaded",
    "analyze_sae",
    "auroc",
    "default_db_path",
    "embed_texts",
    "embedding_score",
    "feature_map",
    "features_for_examples",
    "final_norm",
    "heuristic_labels",
    "logit_effects",
    "nearest_features",
    "open_sae_and_model",
    "run_pass",
    "scan_text",
    "search_features",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monoscope.features' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
