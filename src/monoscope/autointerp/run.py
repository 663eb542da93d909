"""Auto-interp end to end: explain each feature of a feature store, score the label on held-out excerpts, save it.

    from monoscope.autointerp import LLMClient, explain_feature, explain_features

    client = LLMClient(base_url="http://localhost:8000/v1", model="my-model")
    label = explain_feature(client, top=top_examples, quantile=quantile_examples, random=random_examples)
    label.explanation, label.detection.accuracy, label.fuzzing.f1
    results = explain_features(store, range(100), client)   # reads a FeatureStore, writes labels "llm:<model>"

The judges score on excerpts the explainer never saw (`monoscope.autointerp.scorers`): detection (which
plain excerpts fire?) and fuzzing (are these marked tokens the firing ones?), plus the offline embedding
score of `monoscope.features.embedding`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from ..errors import MonoscopeError
from ..features.embedding import embedding_score
from ..progress import progress_bar
from .client import BudgetExceeded, LLMClient, LLMError, Usage
from .config import ExplainConfig
from .examples import Example, ExampleLike, ExampleSource, ExampleSplit, split_examples
from .explainer import ExplanationError, explain_examples
from .pool import DaemonPool
from .scorers import ScoreResult, score_detection, score_fuzzing

DEAD = "no firing examples (a dead feature?)"


class LabelStore(Protocol):
    """What auto-interp needs of a feature store (`monoscope.features.store.FeatureStore` has it)."""

    def examples(self, feature_id: int, kind: str) -> Sequence[ExampleLike]: ...

    def labels(self, feature_id: int) -> Sequence[object]: ...  # rows with a `source` (attribute or key)

    def add_label(
        self,
        feature_id: int,
        source: str,
        text: str,
        *,
        detection: float | None = None,
        fuzzing: float | None = None,
        embedding_score: float | None = None,
    ) -> object: ...


@dataclass
class LabelResult:
    """What happened to one feature: its explanation and scores, or the error that stopped it."""

    feature_id: int
    source: str
    explanation: str | None = None
    strict: bool = False
    detection: ScoreResult | None = None
    fuzzing: ScoreResult | None = None
    embedding_score: float | None = None
    error: str | None = None
    n_explain: int = 0
    n_held_out: int = 0
    n_non_activating: int = 0
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    saved: bool = False
    split: ExampleSplit | None = field(default=None, repr=False)  # the excerpts shown and held out

    @property
    def ok(self) -> bool:
        return self.error is None and self.explanation is not None

    @property
    def dead(self) -> bool:
        """The feature had no firing examples to explain."""
        return self.error == DEAD

    def to_dict(self) -> dict[str, object]:
        keys = (
            "feature_id",
            "source",
            "explanation",
            "strict",
            "embedding_score",
            "error",
            "n_explain",
            "n_held_out",
            "n_non_activating",
            "seconds",
            "saved",
        )
        out: dict[str, object] = {k: getattr(self, k) for k in keys}
        out["detection"] = self.detection.to_dict() if self.detection is not None else None
        out["fuzzing"] = self.fuzzing.to_dict() if self.fuzzing is not None else None
        out["usage"] = self.usage.to_dict()
        return out


def explain_feature(
    client: LLMClient,
    top: Sequence[ExampleSource],
    quantile: Sequence[ExampleSource] = (),
    random: Sequence[ExampleSource] = (),
    *,
    feature_id: int = 0,
    score: bool = True,
    config: ExplainConfig | None = None,
    source: str | None = None,
) -> LabelResult:
    """Split the excerpts, explain, and score on the held-out ones. Errors that concern only this feature end up
    in `.error`; fatal endpoint errors (down, junk, unknown model, budget) are raised."""
    cfg = config or ExplainConfig()
    start = time.monotonic()
    result = LabelResult(feature_id=feature_id, source=source or f"llm:{client.model}")
    seed = cfg.feature_seed(feature_id)
    split = split_examples(
        top,
        quantile,
        random,
        n_top=cfg.n_top,
        n_quantile=cfg.n_quantile,
        n_held_out=cfg.n_held_out,
        n_non_activating=cfg.n_non_activating,
        seed=seed,
    )
    result.split = split
    result.n_explain, result.n_held_out, result.n_non_activating = (
        len(split.explain),
        len(split.activating),
        len(split.non_activating),
    )
    try:
        if not split.explain:
            raise ExplanationError(DEAD)
        explanation = explain_examples(client, split.explain, config=cfg)
        result.explanation, result.strict = explanation.text, explanation.strict
        result.usage = result.usage + explanation.usage
        if score and split.activating:
            judged = dict(batch_size=cfg.batch_size, context=cfg.context, max_tokens=cfg.judge_max_tokens, seed=seed)
            result.detection = score_detection(
                client, explanation.text, split.activating, split.non_activating, **judged
            )
            result.fuzzing = score_fuzzing(client, explanation.text, split.activating, **judged)
            result.usage = result.usage + result.detection.usage + result.fuzzing.usage
    except LLMError as err:
        if err.fatal:  # the endpoint is down or junk, or the budget is spent
            raise
        result.error = str(err)
    except MonoscopeError as err:
        result.error = str(err)
    result.seconds = time.monotonic() - start
    return result


# ---------------------------------------------------------------- many features from a store


class LabelRun(list[LabelResult]):
    """The `LabelResult`s of `explain_features`, with the run's totals and why it stopped early, if it did."""

    def __init__(self, results: Iterable[LabelResult] = ()):
        super().__init__(results)
        self.stopped: str | None = None
        self.usage = Usage()
        self.skipped = 0
        self.seconds = 0.0

    @property
    def n_ok(self) -> int:
        return sum(1 for r in self if r.ok)

    @property
    def n_dead(self) -> int:
        return sum(1 for r in self if r.dead)

    @property
    def n_failed(self) -> int:
        """Features that have examples but got no label."""
        return sum(1 for r in self if not r.ok and not r.dead)


def _store_examples(store: LabelStore, feature_id: int, kind: str) -> list[ExampleLike]:
    try:
        return list(store.examples(feature_id, kind) or [])
    except MonoscopeError:
        raise
    except (LookupError, ValueError):  # a store without this kind of example
        return []


def _sources(store: LabelStore, feature_id: int) -> set[str]:
    rows = store.labels(feature_id) or []
    sources = (row.get("source") if isinstance(row, dict) else getattr(row, "source", None) for row in rows)
    return {str(s) for s in sources if s}


def _primary(score: ScoreResult | None) -> float | None:
    return None if score is None else float(score.balanced_accuracy)


def explain_features(
    store: LabelStore,
    feature_ids: Iterable[int],
    client: LLMClient,
    *,
    n_top: int = 10,
    n_quantile: int = 5,
    score: bool = True,
    progress: bool = True,
    embedding: bool = True,
    overwrite: bool = True,
    config: ExplainConfig | None = None,
    max_consecutive_failures: int = 5,
    on_result: Callable[[LabelResult], None] | None = None,
) -> LabelRun:
    """Explain (and score) each feature from the store's "top", "quantile" and "random" examples and save the
    label with `store.add_label(feature_id, "llm:<model>", text, detection=..., fuzzing=..., embedding_score=...)`
    (detection and fuzzing are saved as balanced accuracies, 0.5 = chance; the full `ScoreResult`s are in the
    returned `LabelResult`s).

    Features run `client.concurrency` at a time; the store is only touched from the calling thread. A feature
    that fails (no examples, a rejected prompt, no explanation in the answer) is recorded and the run goes on;
    the endpoint going down or answering junk raises `LLMError` (labels saved so far stay saved), and so does
    `max_consecutive_failures` features failing in a row. When the client's cost limit is spent, the run stops
    and returns what it has (`.stopped` says why). With `overwrite=False`, features that already have a label
    from this model are skipped (so an interrupted run continues)."""
    cfg = dataclasses.replace(config or ExplainConfig(), n_top=n_top, n_quantile=n_quantile)
    client.check()
    runner = _Runner(
        store,
        client,
        cfg,
        [int(f) for f in feature_ids],
        progress=progress,
        score=score,
        embedding=embedding and score,
        overwrite=overwrite,
        max_consecutive_failures=max_consecutive_failures,
        on_result=on_result,
    )
    return runner.run()


class _Runner:
    """One `explain_features` run: features in flight on a thread pool, results saved from the calling thread."""

    def __init__(
        self,
        store: LabelStore,
        client: LLMClient,
        config: ExplainConfig,
        feature_ids: list[int],
        *,
        progress: bool,
        score: bool,
        embedding: bool,
        overwrite: bool,
        max_consecutive_failures: int,
        on_result: Callable[[LabelResult], None] | None,
    ):
        self.store, self.client, self.config, self.feature_ids = store, client, config, feature_ids
        self.score, self.embedding, self.overwrite = score, embedding, overwrite
        self.max_consecutive_failures, self.on_result = max_consecutive_failures, on_result
        self.source = f"llm:{client.model}"
        self.results = LabelRun()
        self.consecutive_failures = 0
        self.fatal: LLMError | None = None
        self.start_usage = client.usage
        self.started = time.monotonic()
        self.bar = progress_bar(total=len(feature_ids), desc="explain", unit="feature", enabled=progress)

    def run(self) -> LabelRun:
        todo = iter(self.feature_ids)
        pending: dict[Future[LabelResult], int] = {}
        pool = DaemonPool(self.client.concurrency, name="monoscope-explain")
        try:
            while True:
                self._submit(todo, pool, pending)
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                in_order = sorted(done, key=lambda f: pending[f])
                for future in in_order:
                    pending.pop(future)
                self._collect(in_order)
                self._check_failures()
                if self.fatal is not None or self.results.stopped is not None:
                    for future in pending:
                        future.cancel()  # not started yet: never will
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown()
            self.bar.close()
            self.results.usage = self.client.usage - self.start_usage
            self.results.seconds = time.monotonic() - self.started
        if self.fatal is not None:
            saved = sum(1 for r in self.results if r.saved)
            raise LLMError(
                f"{self.fatal} ({saved} labels saved before it)" if saved else str(self.fatal)
            ) from self.fatal
        return self.results

    def _submit(self, todo: Iterator[int], pool: DaemonPool, pending: dict[Future[LabelResult], int]) -> None:
        """Keep twice `concurrency` features in flight (so the judges' requests fill the slots too)."""
        while self.fatal is None and self.results.stopped is None and len(pending) < 2 * self.client.concurrency:
            fid = next(todo, None)
            if fid is None:
                return
            if not self.overwrite and self.source in _sources(self.store, fid):
                self.results.skipped += 1
                self.bar.update(1)
                continue
            top = _store_examples(self.store, fid, "top")
            if not any(Example.of(e).fires for e in top):
                self._finish(LabelResult(feature_id=fid, source=self.source, error=DEAD))
                continue
            quantile = _store_examples(self.store, fid, "quantile")
            negatives = _store_examples(self.store, fid, "random") if self.score else []
            future = pool.submit(self._explain, fid, top, quantile, negatives)
            pending[future] = fid

    def _explain(
        self, fid: int, top: list[ExampleLike], quantile: list[ExampleLike], negatives: list[ExampleLike]
    ) -> LabelResult:
        return explain_feature(
            self.client,
            top,
            quantile,
            negatives,
            feature_id=fid,
            score=self.score,
            config=self.config,
            source=self.source,
        )

    def _collect(self, done: list[Future[LabelResult]]) -> None:
        for future in done:
            if future.cancelled():
                continue
            try:
                self._finish(future.result())
            except BudgetExceeded as err:
                self.results.stopped = self.results.stopped or str(err)
            except LLMError as err:
                self.fatal = self.fatal or err

    def _check_failures(self) -> None:
        limit = self.max_consecutive_failures
        if self.fatal is None and limit and self.consecutive_failures >= limit:
            last = next((r.error for r in reversed(self.results) if r.error), "unknown")
            self.fatal = LLMError(
                f"stopped after {self.consecutive_failures} features in a row failed; the last error: {last}"
            )

    def _finish(self, result: LabelResult) -> None:
        """Score the label by embeddings, save it, count it (from the calling thread only)."""
        if result.ok and result.explanation is not None:
            result.embedding_score = self._embedding_score(result.explanation, result.split)
            self.store.add_label(
                result.feature_id,
                self.source,
                result.explanation,
                detection=_primary(result.detection),
                fuzzing=_primary(result.fuzzing),
                embedding_score=result.embedding_score,
            )
            result.saved = True
            self.consecutive_failures = 0
        elif not result.dead:  # dead features do not count as the endpoint failing
            self.consecutive_failures += 1
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)
        self._show_progress()

    def _embedding_score(self, explanation: str, split: ExampleSplit | None) -> float | None:
        if not self.embedding or split is None or not split.activating or not split.non_activating:
            return None
        context = self.config.context
        try:
            value = float(
                embedding_score(
                    explanation,
                    [e.window(context).text for e in split.activating],
                    [e.window(context).text for e in split.non_activating],
                )
            )
        except MonoscopeError:
            return None
        return value if math.isfinite(value) else None

    def _show_progress(self) -> None:
        used = self.client.usage - self.start_usage
        parts = [f"{self.results.n_ok} ok", f"{self.results.n_failed} failed"]
        if self.client.has_prices:
            parts.append(f"${used.cost_usd:.4f}")
        parts += [f"{used.total_tokens / 1000:.1f}k tok", f"{time.monotonic() - self.started:.0f}s"]
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.update(1)
