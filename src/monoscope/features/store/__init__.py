"""The feature database: one SQLite file per SAE (default `<sae folder>/features.db`).

Schema version 1 (docs/feature-db.md describes every column):

    meta(key, value)                        schema_version, sae_path, model, hook_point, d_sae, d_in,
                                            tokens_analysed, contexts_analysed, created, ... (values are JSON)
    features(id, n_active, n_contexts, density, mean_activation, max_activation, std_activation, label,
             label_source)
    examples(feature_id, kind, rank, bin, context, start, length, peak, activation, activations)
        kind 'top' | 'quantile' | 'random'; the window's tokens are contexts[context][start:start+length];
        activations: `length` little-endian floats (meta acts_dtype), NULL when all zero (random examples)
    contexts(id, token_ids)                 every context an example uses, BOS included (meta token_dtype)
    tokens(id, text)                        the decoded string of every token id that appears in a context
    histograms(feature_id, first_bin, counts)   int32 counts over meta hist_edges[first_bin:]
    logit_effects(feature_id, direction 'up'|'down', rank, token_id, value)
    neighbours(feature_id, rank, neighbour_id, cosine)
    map(feature_id, x, y)                   2-D layout in [0, 1] (meta map_method)
    labels(id, feature_id, source, text, detection, fuzzing, embedding_score, created)
    labels_fts(main, promoted)              FTS5 index (porter, unicode61) of labels.text, rowid = labels.id;
                                            a heuristic label's promoted tokens (after ' → ') in `promoted`
    label_embeddings(label_id, model, vector)   float32 [384] of each label (meta embedding_model)
    example_embeddings(feature_id, vector)  float32 [384]: the normalised mean embedding of the texts a feature
                                            fires on most (absent in databases analysed without embeddings
                                            or by an earlier monoscope)

Writers build the whole file under a temporary name in the same folder and rename it into place when it is
complete (`StoreBuilder`), so readers never see a half-written database; readers open it read-only
(`file:...?mode=ro`). `FeatureStore.add_label` is the one write to a finished database (for `monoscope
explain`); it opens a read-write connection on first use.
"""

from __future__ import annotations

from .builder import ExampleRow, FeatureRow, StoreBuilder, StoredLabel, carried_labels, remove_stale_temporaries
from .reader import FeatureStore
from .records import Example, FeatureRecord, Label, Neighbour, TokenEffect
from .schema import (
    DB_FILENAME,
    EXAMPLE_KINDS,
    SCHEMA,
    SCHEMA_VERSION,
    TOKEN_LABEL_SOURCE,
    default_db_path,
    now_iso,
    refresh_shown_labels,
)

__all__ = [
    "DB_FILENAME",
    "EXAMPLE_KINDS",
    "Example",
    "ExampleRow",
    "FeatureRecord",
    "FeatureRow",
    "FeatureStore",
    "Label",
    "Neighbour",
    "SCHEMA",
    "SCHEMA_VERSION",
    "StoreBuilder",
    "StoredLabel",
    "TOKEN_LABEL_SOURCE",
    "TokenEffect",
    "carried_labels",
    "default_db_path",
    "now_iso",
    "refresh_shown_labels",
    "remove_stale_temporaries",
]
