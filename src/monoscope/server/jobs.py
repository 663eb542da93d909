"""Model jobs other than completions: scan, search by example, steering suggestions and attribution.

Each runs on the model thread (`ModelWorker.submit`), between two decoding steps, so steering hooks of the
batch never leak into them; a fault the client can fix is a 400 naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, cast

from ..errors import MonoscopeError
from . import schemas as S
from .dashboards import finite, sparkline
from .errors import ApiError
from .saes import ServedSAE

if TYPE_CHECKING:
    from ..model import LoadedModel


class ModelJobs:
    """The answers of the routes that run the model (other than completions)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm

    def scan(self, served: ServedSAE, req: S.ScanRequest) -> S.ScanResponse:
        from ..features.scan import scan_text

        try:
            r = scan_text(
                req.text,
                sae=served.sae,
                loaded=self.lm,
                hook=served.hook,
                store=served.store,
                top=req.top,
                n_top_features=req.n_top_features,
            )
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_text", "text") from None
        ids = sorted({f.id for t in r.tokens for f in t.features} | {t.id for t in r.top})
        maxima = (
            {rec.id: float(rec.max_activation) for rec in served.store.features(ids)}
            if served.store is not None
            else {}
        )

        def fraction(fid: int, value: float) -> float | None:
            m = maxima.get(fid)
            return round(float(value) / m, 4) if m else None

        return S.ScanResponse(
            sae=served.id,
            text=r.text,
            truncated=r.truncated,
            notes=list(r.notes),
            tokens=[
                S.ScannedToken(
                    position=t.position,
                    token=t.token,
                    token_id=t.token_id,
                    features=[
                        S.FeatureHitOut(
                            id=f.id,
                            activation=float(f.activation),
                            fraction=fraction(f.id, f.activation),
                            label=f.label,
                        )
                        for f in t.features
                    ],
                )
                for t in r.tokens
            ],
            top=[
                S.TopFeatureOut(
                    id=t.id,
                    max_activation=float(t.max_activation),
                    n_tokens=t.n_tokens,
                    position=t.position,
                    label=t.label,
                    density=finite(t.density),
                    corpus_max_activation=maxima.get(t.id),
                )
                for t in r.top
            ],
        )

    def example_search(self, served: ServedSAE, req: S.ExampleSearchRequest) -> S.ExampleSearchResponse:
        from ..features.search import features_for_examples

        try:
            hits = features_for_examples(
                req.texts,
                sae=served.sae,
                loaded=self.lm,
                hook=served.hook,
                store=served.store,
                contrast=req.contrast,
                limit=req.limit,
            )
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_examples", "texts") from None
        out = []
        for h in hits:
            counts = served.store.histogram(h.feature_id)[1] if served.store is not None else []
            out.append(
                S.ExampleSearchHit(
                    id=h.feature_id,
                    score=finite(h.score) or 0.0,
                    example_mean=float(h.example_mean),
                    baseline_mean=float(h.baseline_mean),
                    fired_in=float(h.fired_in),
                    label=h.label,
                    density=finite(h.density),
                    sparkline=sparkline(counts),
                )
            )
        return S.ExampleSearchResponse(sae=served.id, hits=out)

    def suggest(self, served: ServedSAE, req: S.SuggestRequest) -> S.SuggestResponse:
        from ..steer.featuredb import FeatureDB
        from ..steer.toward import TowardConfig, plan_steering

        if not req.concept.strip():
            raise ApiError(
                400, "the concept is empty; say what to steer toward, e.g. 'the ocean'", "empty_concept", "concept"
            )
        try:
            plan = plan_steering(
                self.lm,
                served.sae,
                req.concept,
                references=req.references,
                db=FeatureDB(served.store) if served.store is not None else None,
                config=TowardConfig(method=req.method),
                hook=served.hook,
            )
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_suggest", "references") from None
        chosen = plan.chosen
        maxima = (
            {r.id: float(r.max_activation) for r in served.store.features([f for f, _ in chosen.features])}
            if served.store is not None and chosen is not None
            else {}
        )
        if chosen is not None and chosen.vector is not None:
            feats = [
                S.SuggestedFeature(feature=f, value=0.0, multiple=None, label=plan.labels.get(f))
                for f, _ in plan.explanation
            ]
            cosines = [float(c) for _, c in plan.explanation]
        else:
            feats = [
                S.SuggestedFeature(
                    feature=int(f),
                    value=float(v),
                    multiple=(float(v) / maxima[f] if maxima.get(f) else None),
                    label=plan.labels.get(f),
                )
                for f, v in (chosen.features if chosen is not None else [])
            ]
            cosines = []
        kind = cast(
            "Literal['feature', 'group', 'contrast', 'vector', 'diffmean'] | None", chosen.kind if chosen else None
        )
        positions = cast("Literal['all', 'prompt', 'generated']", plan.positions)
        return S.SuggestResponse(
            sae=served.id,
            concept=req.concept,
            works=plan.works,
            kind=kind,
            positions=positions,
            hook_point=plan.hook,
            features=feats,
            vector_cosines=cosines,
            strength=chosen.strength if chosen else None,
            similarity=finite(chosen.similarity) if chosen else None,
            unsteered_similarity=finite(plan.unsteered_similarity),
            mention_rate=finite(chosen.mention_rate) if chosen else None,
            perplexity_ratio=finite(chosen.perplexity_ratio) if chosen else None,
            notes=plan.notes,
            seconds=round(plan.seconds, 2),
        )

    def attribution(self, served: ServedSAE, req: S.AttributionRequest) -> S.AttributionResponse:
        from ..steer.attribution import attribute
        from ..steer.runtime import decode_text

        tok = self.lm.tokenizer
        target_ids = tok(req.target, add_special_tokens=False).input_ids
        if not target_ids:
            raise ApiError(400, f"the target {req.target!r} encodes to no tokens", "invalid_target", "target")
        targets = target_ids[:32] if req.per_token else target_ids[:1]
        labels: dict[int, str] = {}
        results = []
        prefix = ""
        for i, tid in enumerate(targets):
            try:
                a = attribute(
                    self.lm,
                    served.sae,
                    req.prompt + prefix,
                    int(tid),
                    hook=served.hook,
                    top=req.top,
                    metric=req.metric,
                    raw=not req.chat,
                )
            except MonoscopeError as err:
                raise ApiError(400, str(err), "invalid_attribution", "prompt") from None
            if served.store is not None:
                wanted = [f.feature for f in a.features if f.feature not in labels]
                labels.update({r.id: r.label for r in served.store.features(wanted) if r.label})
            for f in a.features:
                f.label = labels.get(f.feature)
            results.append(
                S.TokenAttribution(
                    target_token=a.target_token,
                    target_id=a.target_id,
                    logit=float(a.logit),
                    logprob=float(a.logprob),
                    total=float(a.total),
                    error_attribution=float(a.error_attribution),
                    features=[
                        S.FeatureAttributionOut(
                            feature=f.feature,
                            attribution=float(f.attribution),
                            activation=float(f.activation),
                            last_activation=float(f.last_activation),
                            label=f.label,
                        )
                        for f in a.features
                    ],
                )
            )
            prefix = decode_text(tok, target_ids[: i + 1])
        return S.AttributionResponse(
            sae=served.id,
            hook_point=served.hook,
            prompt=req.prompt,
            target=req.target,
            metric=req.metric,
            tokens=results,
        )
