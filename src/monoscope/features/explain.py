"""Natural-language explanations of SAE features by an LLM, scored on held-out examples.

The explainer sees ~10 top-activating and ~5 quantile-sampled excerpts with the firing tokens marked
`<<like this>>` and their activations on a 0-10 scale (as in Bills et al. 2023, EleutherAI's delphi and
Neuronpedia's auto-interp) and answers with one line `[EXPLANATION]: ...`. The label is then scored by a
judge LLM on excerpts the explainer never saw (see `monoscope.features.scoring`): detection (which plain
excerpts fire?) and fuzzing (are these marked tokens the firing ones?), plus the offline embedding score
when `monoscope.features.embedding` is available.

    from monoscope.features.llm_client import LLMClient
    from monoscope.features.explain import Example, explain_examples, explain_feature, explain_features

    client = LLMClient(base_url="http://localhost:8000/v1", model="my-model")
    label = explain_feature(client, top=top_examples, quantile=quantile_examples, random=random_examples)
    label.explanation, label.detection.accuracy, label.fuzzing.f1
    results = explain_features(store, range(100), client)   # reads a FeatureStore, writes labels "llm:<model>"
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..config import JsonConfig, require
from ..errors import MonoscopeError
from .llm_client import BudgetExceeded, DaemonPool, LLMClient, LLMError, Usage

# ---------------------------------------------------------------- examples


@dataclass
class Example:
    """One excerpt: its tokens (as text pieces that join into the excerpt) and the feature's activation on each."""

    tokens: list[str]
    activations: list[float]

    def __post_init__(self) -> None:
        self.tokens = [str(t) for t in self.tokens]
        self.activations = [float(a) for a in self.activations]
        if len(self.tokens) != len(self.activations):
            raise MonoscopeError(f"an example has {len(self.tokens)} tokens but {len(self.activations)} activations")

    @classmethod
    def of(cls, obj: Any) -> "Example":
        """An `Example` from anything with `.tokens` and `.activations` (a store row, a dict, an Example)."""
        if isinstance(obj, Example):
            return obj
        if isinstance(obj, dict):
            return cls(list(obj["tokens"]), list(obj["activations"]))
        acts = obj.activations
        if hasattr(acts, "tolist"):
            acts = acts.tolist()
        return cls(list(obj.tokens), list(acts))

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def fires(self) -> bool:
        return self.max_activation > 0

    def window(self, size: int) -> "Example":
        """At most `size` tokens around the strongest activation (three quarters of them before it)."""
        if size <= 0 or len(self.tokens) <= size:
            return self
        peak = max(range(len(self.activations)), key=self.activations.__getitem__)
        start = max(0, min(peak - (3 * size) // 4, len(self.tokens) - size))
        return Example(self.tokens[start : start + size], self.activations[start : start + size])


def examples_of(items: Iterable[Any] | None) -> list[Example]:
    return [Example.of(x) for x in (items or [])]


def _show(token: str) -> str:
    return token.replace("\r", "").replace("\n", "\\n").replace("\t", " ")


def highlight(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The excerpt with marked tokens between `<<` and `>>`; consecutive marked tokens share one pair."""
    out: list[str] = []
    inside = False
    for token, mark in zip(tokens, marked):
        if mark and not inside:
            out.append("<<")
            inside = True
        elif not mark and inside:
            out.append(">>")
            inside = False
        out.append(_show(token))
    if inside:
        out.append(">>")
    return "".join(out)


def plain(tokens: Sequence[str]) -> str:
    return "".join(_show(t) for t in tokens)


def activation_levels(example: Example, scale: float) -> list[int]:
    """Activations on a 0-10 scale relative to `scale` (the strongest activation shown); firing tokens get at least 1."""
    scale = scale if scale > 0 else 1.0
    return [0 if a <= 0 else max(1, min(10, round(10 * a / scale))) for a in example.activations]


def format_explainer_example(example: Example, index: int, scale: float, *, max_listed: int = 12) -> str:
    levels = activation_levels(example, scale)
    marked = [lv > 0 for lv in levels]
    lines = [f"Example {index}: {highlight(example.tokens, marked)}"]
    firing = [(i, lv) for i, lv in enumerate(levels) if lv > 0]
    if firing:
        if len(firing) > max_listed:
            firing = sorted(sorted(firing, key=lambda x: -x[1])[:max_listed])
        listed = ", ".join(f'"{_show(example.tokens[i]).strip() or _show(example.tokens[i])}" {lv}' for i, lv in firing)
        lines.append(f"Activations: {listed}")
    return "\n".join(lines)


# ---------------------------------------------------------------- config


@dataclass
class ExplainConfig(JsonConfig):
    """How many examples each step uses, how they are shown, and how much the LLM may write."""

    n_top: int = 10  # top-activating excerpts shown to the explainer
    n_quantile: int = 5  # quantile-sampled excerpts shown to the explainer
    n_held_out: int = 10  # held-out firing excerpts for scoring
    n_non_activating: int = 10  # held-out non-firing excerpts for detection
    context: int = 64  # tokens per excerpt (a window around the strongest activation)
    batch_size: int = 5  # excerpts per judge prompt
    explain_max_tokens: int = 400
    judge_max_tokens: int = 200
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_top", "n_held_out", "context", "batch_size", "explain_max_tokens", "judge_max_tokens"):
            require(int(getattr(self, name)) >= 1, f"ExplainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_quantile", "n_non_activating"):
            require(int(getattr(self, name)) >= 0, f"ExplainConfig.{name} cannot be negative, got {getattr(self, name)}")
        require(self.temperature >= 0, f"ExplainConfig.temperature cannot be negative, got {self.temperature}")


# ---------------------------------------------------------------- held-out split


@dataclass
class ExampleSplit:
    """Excerpts for the explainer, and disjoint held-out excerpts for scoring."""

    explain: list[Example]
    activating: list[Example]  # held out, firing
    non_activating: list[Example]  # held out, not firing


def split_examples(
    top: Sequence[Any],
    quantile: Sequence[Any] = (),
    random_examples: Sequence[Any] = (),
    *,
    n_top: int = 10,
    n_quantile: int = 5,
    n_held_out: int = 10,
    n_non_activating: int = 10,
    seed: int = 0,
) -> ExampleSplit:
    """The explainer gets the `n_top` strongest top excerpts and `n_quantile` quantile excerpts drawn across the
    quantiles; everything else that fires is held out for scoring (top excerpts beyond `n_top` and the other
    quantile excerpts, alternating so that both strengths are scored), and non-firing random excerpts are the
    negatives. When nothing is left over, every other excerpt is held out instead (if there are at least 4).
    No excerpt text appears on both sides."""
    rng = random.Random(seed)
    tops = sorted((e for e in examples_of(top) if e.fires), key=lambda e: -e.max_activation)
    top_texts = {e.text for e in tops}
    quants = [e for e in examples_of(quantile) if e.fires and e.text not in top_texts]
    shown = tops[:n_top]
    if quants and n_quantile:
        # An even spread over the quantile excerpts (they usually come ordered by strength).
        step = len(quants) / min(n_quantile, len(quants))
        picks = sorted({int(i * step + rng.random() * step) for i in range(min(n_quantile, len(quants)))})
        picked = set(picks)
        shown += [quants[i] for i in picks]
        rest_quant = [e for i, e in enumerate(quants) if i not in picked]
    else:
        rest_quant = quants
    seen = {e.text for e in shown}
    held: list[Example] = []
    extra_top = tops[n_top:]
    for pair in _interleave(extra_top, rest_quant):
        if pair.text not in seen:
            seen.add(pair.text)
            held.append(pair)
    if not held and len(shown) >= 4:
        # Nothing left over (a small store): score on every other shown excerpt rather than not at all.
        held, shown = shown[1::2], shown[::2]
    held = held[:n_held_out]
    negatives = []
    for e in examples_of(random_examples):
        if not e.fires and e.text not in seen:
            seen.add(e.text)
            negatives.append(e)
    rng.shuffle(negatives)
    return ExampleSplit(explain=shown, activating=held, non_activating=negatives[:n_non_activating])


def _interleave(a: Sequence[Example], b: Sequence[Example]) -> Iterable[Example]:
    for i in range(max(len(a), len(b))):
        if i < len(b):
            yield b[i]
        if i < len(a):
            yield a[i]


# ---------------------------------------------------------------- the explainer

EXPLAINER_SYSTEM = (
    "You are a meticulous AI researcher investigating the features of a language model. A feature fires on "
    "certain tokens of a text, depending on the token and on the text before it. You will see excerpts where "
    "one feature fires. The tokens where it fires are marked <<like this>> (consecutive firing tokens share one "
    "pair of markers), and after each excerpt the firing tokens are listed with their activation from 1 to 10 "
    "(10 = the strongest seen).\n"
    "Find what the marked tokens, with the context just before them, have in common, and state what the feature "
    "detects in one short phrase (at most 15 words), specific enough to tell excerpts where it fires from "
    "excerpts where it does not. Do not mention the markers, the numbers or the word 'feature'.\n"
    "You may think briefly first. Your last line must be:\n[EXPLANATION]: <your explanation>"
)


def explainer_prompt(examples: Sequence[Example], *, context: int = 64) -> list[dict[str, str]]:
    """The chat messages that ask for an explanation of the feature firing on `examples`."""
    shown = [Example.of(e).window(context) for e in examples]
    scale = max((e.max_activation for e in shown), default=1.0)
    body = "\n\n".join(format_explainer_example(e, i + 1, scale) for i, e in enumerate(shown))
    user = f"Excerpts where the feature fires:\n\n{body}\n\nWhat does the feature detect? End with the line [EXPLANATION]: ..."
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_MARKER = re.compile(r"\[?\s*explanation\s*\]?\s*[:：\-]\s*(.*)", re.I)
_LEADING = re.compile(r"^(?:[-*>#\s]+|\d+[.)]\s+)")
_MAX_EXPLANATION = 200


def strip_reasoning(text: str) -> str:
    """The answer without `<think>...</think>` blocks (reasoning models)."""
    return _THINK.sub("", text or "").strip()


def _clean(line: str) -> str:
    line = _LEADING.sub("", line.strip())
    line = line.replace("**", "").replace("__", "").replace("`", "")
    line = " ".join(line.split())
    while len(line) >= 2 and (line[0], line[-1]) in (('"', '"'), ("'", "'"), ("“", "”")):
        line = line[1:-1].strip()
    if len(line) > _MAX_EXPLANATION:
        line = line[:_MAX_EXPLANATION].rsplit(" ", 1)[0] + "..."
    return line.rstrip(" .")


def parse_explanation(text: str) -> tuple[str | None, bool]:
    """(explanation, strict): the text after the last `[EXPLANATION]:` (strict), else the last non-empty line
    with a word in it (not strict, e.g. a model that ignored the format), else (None, False)."""
    answer = strip_reasoning(text)
    lines = [ln for ln in answer.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        match = _MARKER.search(lines[i])
        if match and (i == 0 or "explanation" in lines[i].lower()):
            rest = _clean(match.group(1))
            if not rest:  # the answer is on the next line
                following = [_clean(x) for x in lines[i + 1 :] if _clean(x)]
                rest = following[0] if following else ""
            if _has_words(rest):
                return rest, True
    for line in reversed(lines):
        cleaned = _clean(line)
        if _has_words(cleaned):
            return cleaned, False
    return None, False


def _has_words(text: str) -> bool:
    return bool(re.search(r"[^\W\d_]{2,}", text or ""))


@dataclass
class Explanation:
    text: str
    strict: bool  # the model followed the `[EXPLANATION]:` format
    raw: str
    usage: Usage


class ExplanationError(MonoscopeError):
    """The explainer's answer held no explanation."""


def explain_examples(client: LLMClient, examples: Sequence[Any], *, config: ExplainConfig | None = None) -> Explanation:
    """Ask the explainer LLM what `examples` (firing excerpts) have in common; raise `ExplanationError` when
    its answer holds no explanation, `LLMError` when the endpoint fails."""
    cfg = config or ExplainConfig()
    shown = examples_of(examples)
    if not shown:
        raise ExplanationError("no firing examples to explain")
    result = client.chat(explainer_prompt(shown, context=cfg.context), max_tokens=cfg.explain_max_tokens, temperature=cfg.temperature)
    text, strict = parse_explanation(result.text)
    if text is None:
        raise ExplanationError(f"the explainer's answer held no explanation: {result.text[:80]!r}")
    return Explanation(text=text, strict=strict, raw=result.text, usage=result.usage)


# ---------------------------------------------------------------- one feature, end to end


DEAD = "no firing examples (a dead feature?)"


@dataclass
class LabelResult:
    """What happened to one feature: its explanation and scores, or the error that stopped it."""

    feature_id: int
    source: str
    explanation: str | None = None
    strict: bool = False
    detection: Any = None  # scoring.ScoreResult
    fuzzing: Any = None  # scoring.ScoreResult
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

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("feature_id", "source", "explanation", "strict", "embedding_score", "error",
                                              "n_explain", "n_held_out", "n_non_activating", "seconds", "saved")}
        out["detection"] = self.detection.to_dict() if self.detection is not None else None
        out["fuzzing"] = self.fuzzing.to_dict() if self.fuzzing is not None else None
        out["usage"] = self.usage.to_dict()
        return out


def explain_feature(
    client: LLMClient,
    top: Sequence[Any],
    quantile: Sequence[Any] = (),
    random: Sequence[Any] = (),
    *,
    feature_id: int = 0,
    score: bool = True,
    config: ExplainConfig | None = None,
    source: str | None = None,
) -> LabelResult:
    """Split the excerpts, explain, and score on the held-out ones. Errors that concern only this feature end up
    in `.error`; fatal endpoint errors (down, junk, unknown model, budget) are raised."""
    from .scoring import score_detection, score_fuzzing

    cfg = config or ExplainConfig()
    start = time.monotonic()
    result = LabelResult(feature_id=feature_id, source=source or f"llm:{client.model}")
    split = split_examples(top, quantile, random, n_top=cfg.n_top, n_quantile=cfg.n_quantile, n_held_out=cfg.n_held_out,
                           n_non_activating=cfg.n_non_activating, seed=cfg.seed * 1_000_003 + feature_id)
    result.n_explain, result.n_held_out, result.n_non_activating = len(split.explain), len(split.activating), len(split.non_activating)
    try:
        if not split.explain:
            raise ExplanationError(DEAD)
        explanation = explain_examples(client, split.explain, config=cfg)
        result.explanation, result.strict = explanation.text, explanation.strict
        result.usage = result.usage + explanation.usage
        if score and split.activating:
            seed = cfg.seed * 1_000_003 + feature_id
            result.detection = score_detection(client, explanation.text, split.activating, split.non_activating,
                                               batch_size=cfg.batch_size, context=cfg.context, max_tokens=cfg.judge_max_tokens, seed=seed)
            result.usage = result.usage + result.detection.usage
            result.fuzzing = score_fuzzing(client, explanation.text, split.activating,
                                           batch_size=cfg.batch_size, context=cfg.context, max_tokens=cfg.judge_max_tokens, seed=seed)
            result.usage = result.usage + result.fuzzing.usage
    except (BudgetExceeded, KeyboardInterrupt):
        raise
    except LLMError as err:
        if err.fatal:
            raise
        result.error = str(err)
    except MonoscopeError as err:
        result.error = str(err)
    result.seconds = time.monotonic() - start
    result.split = split
    return result


# ---------------------------------------------------------------- many features from a store


class LabelRun(list):
    """The `LabelResult`s of `explain_features`, with the run's totals and why it stopped early, if it did."""

    def __init__(self, *args: Any):
        super().__init__(*args)
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


def _store_examples(store: Any, feature_id: int, kind: str) -> list[Any]:
    try:
        return list(store.examples(feature_id, kind) or [])
    except MonoscopeError:
        raise
    except (KeyError, ValueError, LookupError):
        return []


def _embedding_scorer() -> Callable[..., float] | None:
    try:
        from .embedding import embedding_score  # provided by monoscope.features.embedding, when present
    except ImportError:
        return None
    return embedding_score


def _existing_sources(store: Any, feature_id: int) -> set[str]:
    labels = getattr(store, "labels", None)
    if labels is None:
        return set()
    try:
        rows = labels(feature_id)
    except Exception:  # noqa: BLE001 - a store without labels for this feature
        return set()
    out = set()
    for row in rows or []:
        source = row.get("source") if isinstance(row, dict) else getattr(row, "source", None)
        if source:
            out.add(str(source))
    return out


def _primary(score: Any) -> float | None:
    return None if score is None else float(score.balanced_accuracy)


def explain_features(
    store: Any,
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
    from ..progress import progress_bar

    cfg = dataclasses.replace(config or ExplainConfig(), n_top=n_top, n_quantile=n_quantile)
    client.check()
    source = f"llm:{client.model}"
    scorer = _embedding_scorer() if (embedding and score) else None
    ids = [int(f) for f in feature_ids]
    run = LabelRun()
    start_usage = client.usage
    started = time.monotonic()
    bar = progress_bar(total=len(ids), desc="explain", unit="feature", enabled=progress)
    consecutive = 0
    fatal: BaseException | None = None

    def postfix() -> None:
        used = client.usage
        spent = used.cost_usd - start_usage.cost_usd
        parts = [f"{run.n_ok} ok", f"{run.n_failed} failed"]
        if client.has_prices:
            parts.append(f"${spent:.4f}")
        parts.append(f"{(used.total_tokens - start_usage.total_tokens) / 1000:.1f}k tok")
        parts.append(f"{time.monotonic() - started:.0f}s")
        bar.set_postfix_str(", ".join(parts), refresh=False)

    def finish(result: LabelResult) -> None:
        nonlocal consecutive
        split = result.split
        if result.ok and scorer is not None and split is not None and split.activating and split.non_activating:
            try:
                value = float(scorer(result.explanation, [e.window(cfg.context).text for e in split.activating],
                                     [e.window(cfg.context).text for e in split.non_activating]))
                result.embedding_score = value if math.isfinite(value) else None
            except MonoscopeError:
                result.embedding_score = None
        if result.ok:
            store.add_label(result.feature_id, source, result.explanation, detection=_primary(result.detection),
                            fuzzing=_primary(result.fuzzing), embedding_score=result.embedding_score)
            result.saved = True
            consecutive = 0
        elif not result.dead:  # dead features do not count as the endpoint failing
            consecutive += 1
        run.append(result)
        if on_result is not None:
            on_result(result)
        postfix()
        bar.update(1)

    todo = iter(ids)
    pending: dict[Future, int] = {}
    pool = DaemonPool(client.concurrency, name="monoscope-explain")
    try:
        while True:
            while fatal is None and run.stopped is None and len(pending) < 2 * client.concurrency:
                fid = next(todo, None)
                if fid is None:
                    break
                if not overwrite and source in _existing_sources(store, fid):
                    run.skipped += 1
                    bar.update(1)
                    continue
                top = _store_examples(store, fid, "top")
                if not any(Example.of(e).fires for e in top):
                    finish(LabelResult(feature_id=fid, source=source, error=DEAD))
                    continue
                quantile = _store_examples(store, fid, "quantile")
                rand = _store_examples(store, fid, "random") if score else []
                pending[pool.submit(explain_feature, client, top, quantile, rand, feature_id=fid, score=score, config=cfg, source=source)] = fid
            if not pending:
                break
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: pending[f]):
                pending.pop(fut)
                if fut.cancelled():
                    continue
                try:
                    finish(fut.result())
                except BudgetExceeded as err:
                    run.stopped = run.stopped or str(err)
                except LLMError as err:
                    fatal = fatal or err
            if fatal is None and max_consecutive_failures and consecutive >= max_consecutive_failures:
                last = next((r.error for r in reversed(run) if r.error), "unknown")
                fatal = LLMError(f"stopped after {consecutive} features in a row failed; the last error: {last}")
            if fatal is not None or run.stopped is not None:
                for fut in pending:
                    fut.cancel()  # not started yet: never will
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown()
        bar.close()
        run.usage = _diff(client.usage, start_usage)
        run.seconds = time.monotonic() - started
    if fatal is not None:
        saved = sum(1 for r in run if r.saved)
        raise LLMError(f"{fatal} ({saved} labels saved before it)" if saved else str(fatal)) from fatal
    return run


def _diff(after: Usage, before: Usage) -> Usage:
    return Usage(*(getattr(after, f) - getattr(before, f) for f in ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "seconds", "retries", "estimated")))


# ---------------------------------------------------------------- feature selection for the CLI


def parse_feature_spec(spec: str, n_features: int | None = None) -> list[int] | str:
    """`"0-99"`, `"3,7,10-12"` -> ids; `"all"` and `"top-density"` are returned as they are (the caller knows the store)."""
    spec = spec.strip().lower()
    if spec in ("all", "top-density"):
        return spec
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*(?:-|\.\.)\s*(\d+)", part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise MonoscopeError(f"--features {part}: the range ends before it starts")
            ids.extend(range(lo, hi + 1))
        elif part.isdigit():
            ids.append(int(part))
        else:
            raise MonoscopeError(f"--features {spec!r}: use ranges and ids like 0-99,120, or 'all', or 'top-density'")
    if not ids:
        raise MonoscopeError("--features selects no features")
    if n_features is not None:
        bad = [i for i in ids if i >= n_features]
        if bad:
            raise MonoscopeError(f"--features: feature {bad[0]} does not exist; the SAE has {n_features} features (0-{n_features - 1})")
    return list(dict.fromkeys(ids))


def register_explain(subparsers: Any) -> argparse.ArgumentParser:
    """Add `monoscope explain` to an argparse subparsers object (see `monoscope.features.explain_cli`)."""
    from .explain_cli import register

    return register(subparsers)
