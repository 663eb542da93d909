"""Which heuristic label each feature shows, and how well it holds: embedding scores (the analysis step).

A label's embedding score is the AUROC with which the cosine between its embedding and a text's tells the
feature's activating texts from random ones it never fired in. Activating texts are the aligned chunks of
`chunk_len` tokens that hold the peaks of its top and quantile examples; non-activating texts, chunks of its
random examples' contexts. Chunks are shared between features, so the texts to embed grow with the contexts,
not with d_sae. The label is chosen (token label or concept label) on the examples that made it, and scored
on the others (out of sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..progress import progress_bar
from .collect import Examples, TokenTexts
from .labels import HeuristicLabels
from .store import TOKEN_LABEL_SOURCE

#: A chunk of a context: (context id, chunk index).
Chunk = tuple[int, int]


@dataclass
class LabelScores:
    """The heuristic label shown for each feature, its token label, their embedding scores and vectors."""

    labels: list[str]  # the label shown (the token label or a concept label)
    token_labels: list[str]
    scores: list[float]  # of the label shown (NaN: not scored)
    token_scores: list[float]
    embedding_model: str | None = None
    label_vectors: np.ndarray | None = None  # [d_sae, dim] of the labels shown
    token_vectors: np.ndarray | None = None  # [d_sae, dim] of the token labels
    example_vectors: np.ndarray | None = None  # [d_sae, dim]: the normalised mean of its activating texts'

    @classmethod
    def unscored(cls, token_labels: list[str]) -> "LabelScores":
        """Without embeddings: the token labels, shown and unscored."""
        nan = [math.nan] * len(token_labels)
        return cls(list(token_labels), list(token_labels), nan, list(nan))

    def token_label_features(self) -> list[int]:
        """The features showing a concept label: their token label is stored beside it."""
        return [f for f, (shown, token) in enumerate(zip(self.labels, self.token_labels)) if shown != token]

    def label_rows(self, created: str) -> Iterator[tuple[int, int, str, str, float | None, str]]:
        """Label ids 1..d_sae: the labels shown (source 'heuristic')."""
        for f, (text, score) in enumerate(zip(self.labels, self.scores)):
            yield (f + 1, f, "heuristic", text, _number(score), created)

    def token_label_rows(self, created: str) -> Iterator[tuple[int, int, str, str, float | None, str]]:
        """Label ids d_sae + 1...: the token labels of the features showing a concept label."""
        d_sae = len(self.labels)
        for i, f in enumerate(self.token_label_features()):
            yield (d_sae + 1 + i, f, TOKEN_LABEL_SOURCE, self.token_labels[f], _number(self.token_scores[f]), created)

    def label_embedding_rows(self) -> Iterator[tuple[int, str | None, bytes]]:
        if self.label_vectors is not None:
            for f in range(len(self.labels)):
                yield (f + 1, self.embedding_model, self.label_vectors[f].astype("<f4").tobytes())

    def token_label_embedding_rows(self) -> Iterator[tuple[int, str | None, bytes]]:
        if self.label_vectors is not None and self.token_vectors is not None:
            d_sae = len(self.labels)
            for i, f in enumerate(self.token_label_features()):
                yield (d_sae + 1 + i, self.embedding_model, self.token_vectors[f].astype("<f4").tobytes())

    def example_embedding_rows(self, dead: list[bool]) -> Iterator[tuple[int, bytes]]:
        if self.example_vectors is not None:
            for f in range(len(self.labels)):
                if not dead[f]:
                    yield (f, self.example_vectors[f].astype("<f4").tobytes())


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass
class _Chunks:
    """Aligned chunks of `length` tokens of the analysed contexts, and their text."""

    examples: Examples
    texts: TokenTexts
    length: int

    def of(self, context: int, position: int) -> Chunk:
        return context, (position - 1) // self.length

    def text(self, chunk: Chunk) -> str:
        context, j = chunk
        start = 1 + j * self.length
        length = min(self.length, self.examples.body - start + 1)
        return self.texts.window(self.examples.contexts, context, start, length)


def _alternate(top_part: list[Chunk], quantile_part: list[Chunk], avoid: set[int], n: int) -> list[Chunk]:
    """Up to n chunks, top and quantile examples alternately (strongest bins first), one text per chunk, none
    from the contexts in `avoid`."""
    chosen: list[Chunk] = []
    pairs = zip(top_part + [None] * len(quantile_part), quantile_part + [None] * len(top_part))
    for a, b in pairs:
        for item in (a, b):
            if item is not None and item not in chosen and item[0] not in avoid:
                chosen.append(item)
        if len(chosen) >= n:
            break
    return chosen[:n]


@dataclass
class _FeatureTexts:
    """Per feature: activating and non-activating texts that choose the label, and others that score it."""

    make_pos: list[list[str]]
    make_neg: list[list[str]]
    score_pos: list[list[str]]
    score_neg: list[list[str]]


def _feature_texts(
    heuristic: HeuristicLabels, examples: Examples, texts: TokenTexts, n: int, chunk_len: int
) -> _FeatureTexts:
    chunks = _Chunks(examples, texts, chunk_len)
    out = _FeatureTexts([], [], [], [])
    top_ctx, top_peak = examples.top.context.tolist(), examples.top.peak.tolist()
    q_ctx, q_peak = examples.quantile_context.tolist(), examples.quantile_peak.tolist()
    n_top = examples.top.context.shape[1]
    q_making = heuristic.making[:, n_top:].tolist()
    for f in range(len(heuristic.token_labels)):
        top_m = [chunks.of(c, p) for c, p in zip(top_ctx[f][0::2], top_peak[f][0::2]) if c >= 0]
        top_s = [chunks.of(c, p) for c, p in zip(top_ctx[f][1::2], top_peak[f][1::2]) if c >= 0]
        quantile = list(enumerate(zip(q_ctx[f], q_peak[f])))
        qm = [chunks.of(c, p) for i, (c, p) in quantile if c >= 0 and q_making[f][i]][::-1]
        qs = [chunks.of(c, p) for i, (c, p) in quantile if c >= 0 and i % 2 == 1][::-1]
        made_from = {c for c, _ in top_m + qm}
        out.make_pos.append([chunks.text(k) for k in _alternate(top_m, qm, set(), n)])
        out.score_pos.append([chunks.text(k) for k in _alternate(top_s, qs, made_from, n)])
        negs = [
            chunks.text(chunks.of(int(examples.pool_context[s]), int(examples.pool_centre[s])))
            for s in examples.random_slots(f)
        ]
        out.make_neg.append(negs[0::2][:n])
        out.score_neg.append(negs[1::2][:n])
    return out


def _embed_all(groups: list[list[list[str]]], progress: bool, step: int = 1024) -> tuple[dict[str, int], np.ndarray]:
    """Embed every distinct text once: (text -> row, [texts, dim] unit vectors)."""
    from .embedding import EMBEDDING_DIM, embed_texts

    all_texts = list(dict.fromkeys(t for group in groups for texts in group for t in texts))
    vectors = np.zeros((len(all_texts), EMBEDDING_DIM), dtype=np.float32)
    bar = progress_bar(total=len(all_texts), desc="embed", unit="text", enabled=progress)
    for lo in range(0, len(all_texts), step):
        vectors[lo : lo + step] = embed_texts(all_texts[lo : lo + step])
        bar.update(len(all_texts[lo : lo + step]))
    bar.close()
    return {t: i for i, t in enumerate(all_texts)}, vectors


def score_labels(
    heuristic: HeuristicLabels,
    examples: Examples,
    texts: TokenTexts,
    dead: list[bool],
    *,
    n_texts: int,
    chunk_len: int,
    progress: bool = True,
) -> LabelScores:
    """Choose each live feature's label among `heuristic.options` by how well it tells the making examples'
    texts from random ones, score it (and the token label) on the other examples, and embed the labels and
    what each feature fires on (search by meaning)."""
    from .embedding import EMBEDDING_MODEL, auroc

    d_sae = len(heuristic.token_labels)
    candidates = [heuristic.options(f) for f in range(d_sae)]
    feature_texts = _feature_texts(heuristic, examples, texts, n_texts, chunk_len)
    index, vectors = _embed_all(
        [candidates, feature_texts.make_pos, feature_texts.make_neg, feature_texts.score_pos, feature_texts.score_neg],
        progress,
    )

    def holds(label: str, pos: list[str], neg: list[str]) -> float:
        if not pos or not neg:
            return math.nan
        q = vectors[index[label]]
        return auroc(vectors[[index[t] for t in pos]] @ q, vectors[[index[t] for t in neg]] @ q)

    labels: list[str] = []
    scores = [math.nan] * d_sae
    token_scores = [math.nan] * d_sae
    for f, options in enumerate(candidates):
        best = options[0]
        if len(options) > 1 and not dead[f]:
            fits = [holds(o, feature_texts.make_pos[f], feature_texts.make_neg[f]) for o in options]
            best = options[int(np.argmax([-1.0 if math.isnan(x) else x for x in fits]))]
        labels.append(best)
        if not dead[f]:
            scores[f] = holds(best, feature_texts.score_pos[f], feature_texts.score_neg[f])
            token_scores[f] = (
                scores[f]
                if best == options[0]
                else holds(options[0], feature_texts.score_pos[f], feature_texts.score_neg[f])
            )
    # what each feature fires on, for search by meaning: the mean of its activating texts' embeddings
    example_vectors = np.zeros((d_sae, vectors.shape[1]), dtype=np.float32)
    for f in range(d_sae):
        fired_on = feature_texts.make_pos[f] + feature_texts.score_pos[f]
        if fired_on and not dead[f]:
            mean = vectors[[index[t] for t in fired_on]].mean(0)
            example_vectors[f] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return LabelScores(
        labels=labels,
        token_labels=list(heuristic.token_labels),
        scores=scores,
        token_scores=token_scores,
        embedding_model=EMBEDDING_MODEL,
        label_vectors=vectors[[index[t] for t in labels]],
        token_vectors=vectors[[index[t] for t in heuristic.token_labels]],
        example_vectors=example_vectors,
    )
