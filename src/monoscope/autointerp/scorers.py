"""Scores for feature explanations: how well does a label predict where the feature fires?

Both scores use a judge LLM on held-out excerpts (never the ones the explainer saw), a few excerpts per
prompt, and ask for a JSON list of 0/1 (line numbers, `1: yes` lines and bare digit strings are read too):

- detection: a shuffled mix of firing and non-firing excerpts, shown plainly; the judge says which ones the
  explanation describes (EleutherAI delphi's "detection").
- fuzzing: firing excerpts with either the truly firing tokens marked `<<like this>>` or as many random
  tokens marked; the judge says whether the marking fits the explanation (delphi's "fuzzing").

An answer that cannot be read counts every excerpt of its prompt as judged wrongly, and shows up in
`parse_failure_rate` (a junk judge therefore scores 0, not chance). So does a prompt the endpoint refused.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from .client import LLMClient, LLMError, Usage
from .examples import Example, ExampleSource, examples_of, highlight, plain, strip_reasoning

DETECTION_SYSTEM = (
    "You are a meticulous linguistics researcher. You will be given an explanation of a feature of a language "
    "model (it fires on certain tokens of a text), followed by numbered text excerpts. For each excerpt, decide "
    "whether the feature, as explained, fires anywhere in it: 1 if the excerpt contains what the explanation "
    "describes, 0 if not. Answer with only a JSON list of 0s and 1s, one per excerpt, in order, e.g. [1, 0, 0, 1, 0]."
)

FUZZING_SYSTEM = (
    "You are a meticulous linguistics researcher. You will be given an explanation of a feature of a language "
    "model (it fires on certain tokens of a text), followed by numbered text excerpts in which some tokens are "
    "marked <<like this>>. In some excerpts the marked tokens are exactly where the feature fires; in others "
    "they were marked at random. For each excerpt, answer 1 if the marked tokens are what the explanation "
    "describes, 0 if not. Answer with only a JSON list of 0s and 1s, one per excerpt, in order, e.g. [1, 0, 0, 1, 0]."
)


@dataclass
class ScoreResult:
    """A judge's verdicts on `n` excerpts: accuracy, precision, recall and F1 (positive = fires / correctly marked).

    Excerpts whose prompt got an unreadable answer (or was refused) count as judged wrongly; `n_unparsed` of
    them, `parse_failure_rate` = n_unparsed / n."""

    method: str
    n: int = 0
    n_positive: int = 0
    accuracy: float = 0.0
    balanced_accuracy: float = 0.0
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    n_unparsed: int = 0
    n_requests: int = 0
    n_failed_requests: int = 0
    usage: Usage = field(default_factory=Usage)
    labels: list[int] = field(default_factory=list)
    predictions: list[int | None] = field(default_factory=list)  # None: unreadable answer

    @property
    def parse_failure_rate(self) -> float:
        return self.n_unparsed / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, str | int | float]:
        keys = (
            "method",
            "n",
            "n_positive",
            "accuracy",
            "balanced_accuracy",
            "precision",
            "recall",
            "f1",
            "n_unparsed",
            "n_requests",
            "n_failed_requests",
        )
        out: dict[str, str | int | float] = {k: getattr(self, k) for k in keys}
        out["parse_failure_rate"] = self.parse_failure_rate
        return out


def classification_metrics(labels: Sequence[int], predictions: Sequence[int | None]) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall, F1; a `None` prediction is counted as wrong."""
    pred = [(1 - y) if p is None else int(p) for y, p in zip(labels, predictions)]
    tp = sum(1 for y, p in zip(labels, pred) if y == 1 and p == 1)
    tn = sum(1 for y, p in zip(labels, pred) if y == 0 and p == 0)
    fp = sum(1 for y, p in zip(labels, pred) if y == 0 and p == 1)
    fn = sum(1 for y, p in zip(labels, pred) if y == 1 and p == 0)
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tpr = tp / (tp + fn) if tp + fn else None
    tnr = tn / (tn + fp) if tn + fp else None
    rates = [r for r in (tpr, tnr) if r is not None]
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "balanced_accuracy": sum(rates) / len(rates) if rates else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


# ---------------------------------------------------------------- reading the judge's answer

_LIST = re.compile(r"\[([^\[\]]*)\]")
_TRUE = {"1", "true", "yes", "y", "match", "matches", "correct"}
_FALSE = {"0", "false", "no", "n", "none", "incorrect"}
_LINE = re.compile(
    r"^\s*(?:[-*#]\s*)?(?:example|excerpt|text)?\s*#?\s*(\d+)\s*[:.)\-=]\s*\**\s*"
    r"(yes|no|true|false|1|0|correct|incorrect|match|no match)\b",
    re.I | re.M,
)


def _value(token: str) -> int | str | None:
    token = token.strip().strip("\"'`*").lower()
    if token in _TRUE and token != "1":
        return 1
    if token in _FALSE and token != "0":
        return 0
    if re.fullmatch(r"\d+", token):
        return int(token)
    return None


def parse_judgement(text: str, n: int) -> list[int] | None:
    """The judge's 0/1 verdicts on `n` excerpts, or None when the answer cannot be read as exactly that.

    Read, in order: the last JSON-like list that is n 0/1 values (or true/false, yes/no) or a set of excerpt
    numbers (1..n, `[]` = none); `N: yes`/`Example N: 0` lines covering every excerpt; a bare `1 0 1 1 0`."""
    answer = strip_reasoning(text)
    if not answer or n <= 0:
        return None
    for body in reversed(_LIST.findall(answer)):
        parts = [p for p in re.split(r"[,\s;]+", body.strip()) if p]
        if not parts:
            return [0] * n  # an empty list of matching excerpts
        values = [_value(p) for p in parts]
        if any(v is None for v in values):
            continue
        if len(values) == n and all(v in (0, 1) for v in values):
            return [int(v) for v in values]  # type: ignore[arg-type]
        numbers = [int(v) for v in values]  # type: ignore[arg-type]
        if (
            all(1 <= v <= n for v in numbers)
            and len(set(numbers)) == len(numbers)
            and (len(numbers) != n or max(numbers) > 1)
        ):
            chosen = set(numbers)
            return [1 if i + 1 in chosen else 0 for i in range(n)]
    verdicts: dict[int, int] = {}
    for match in _LINE.finditer(answer):
        index, word = int(match.group(1)), match.group(2).lower()
        if 1 <= index <= n:
            verdicts[index] = 1 if word in _TRUE else 0
    if len(verdicts) == n:
        return [verdicts[i + 1] for i in range(n)]
    bare = re.fullmatch(r"[\s,;01]*", answer)
    if bare:
        digits = [int(c) for c in answer if c in "01"]
        if len(digits) == n:
            return digits
    return None


# ---------------------------------------------------------------- running a judge


@dataclass
class _Item:
    text: str
    label: int


def _judge(
    client: LLMClient,
    method: str,
    system: str,
    explanation: str,
    items: list[_Item],
    *,
    batch_size: int,
    max_tokens: int,
    instructions: str,
) -> ScoreResult:
    result = ScoreResult(
        method=method, n=len(items), n_positive=sum(i.label for i in items), labels=[i.label for i in items]
    )
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def ask(batch: list[_Item]) -> tuple[list[int] | None, Usage, bool]:
        listed = "\n".join(f"Example {j + 1}: {item.text}" for j, item in enumerate(batch))
        user = (
            f"Explanation: {explanation}\n\n{listed}\n\n{instructions} Answer with a JSON list of exactly {len(batch)} "
            f"values (0 or 1), nothing else."
        )
        try:
            reply = client.chat(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                max_tokens=max_tokens,
                temperature=0.0,
            )
        except LLMError as err:
            if err.fatal:
                raise
            return None, Usage(), True
        return parse_judgement(reply.text, len(batch)), reply.usage, False

    answers = client.map(ask, batches)
    for batch, (verdicts, usage, failed) in zip(batches, answers):
        result.usage = result.usage + usage
        result.n_requests += 1
        result.n_failed_requests += int(failed)
        if verdicts is None:
            result.n_unparsed += len(batch)
            result.predictions.extend([None] * len(batch))
        else:
            result.predictions.extend(verdicts)
    for key, value in classification_metrics(result.labels, result.predictions).items():
        setattr(result, key, value)
    return result


def score_detection(
    client: LLMClient,
    explanation: str,
    activating: Sequence[ExampleSource],
    non_activating: Sequence[ExampleSource],
    *,
    batch_size: int = 5,
    context: int = 64,
    max_tokens: int = 200,
    seed: int = 0,
) -> ScoreResult:
    """Detection: can the judge tell firing from non-firing excerpts (shown as plain text) by the explanation?"""
    items = [_Item(plain(e.window(context).tokens), 1) for e in examples_of(activating)]
    items += [_Item(plain(e.window(context).tokens), 0) for e in examples_of(non_activating)]
    random.Random(seed).shuffle(items)
    return _judge(
        client,
        "detection",
        DETECTION_SYSTEM,
        explanation,
        items,
        batch_size=batch_size,
        max_tokens=max_tokens,
        instructions="Which excerpts contain what the explanation describes?",
    )


def fuzz(example: Example, rng: random.Random) -> list[bool] | None:
    """As many random non-firing tokens marked as the example has firing ones (None if it cannot be done)."""
    firing = [i for i, a in enumerate(example.activations) if a > 0]
    quiet = [i for i, a in enumerate(example.activations) if a <= 0 and example.tokens[i].strip()]
    if not firing or not quiet:
        return None
    chosen = set(rng.sample(quiet, min(len(firing), len(quiet))))
    return [i in chosen for i in range(len(example.tokens))]


def score_fuzzing(
    client: LLMClient,
    explanation: str,
    activating: Sequence[ExampleSource],
    *,
    batch_size: int = 5,
    context: int = 64,
    max_tokens: int = 200,
    seed: int = 0,
) -> ScoreResult:
    """Fuzzing: each firing excerpt appears twice, once with its firing tokens marked (1) and once with as many
    random tokens marked (0); can the judge tell which marking fits the explanation?"""
    rng = random.Random(seed)
    items: list[_Item] = []
    for ex in examples_of(activating):
        ex = ex.window(context)
        true_marks = [a > 0 for a in ex.activations]
        if not any(true_marks):
            continue
        items.append(_Item(highlight(ex.tokens, true_marks), 1))
        fake = fuzz(ex, rng)
        if fake is not None:
            items.append(_Item(highlight(ex.tokens, fake), 0))
    rng.shuffle(items)
    return _judge(
        client,
        "fuzzing",
        FUZZING_SYSTEM,
        explanation,
        items,
        batch_size=batch_size,
        max_tokens=max_tokens,
        instructions="In which excerpts are the marked tokens what the explanation describes?",
    )


def score_summary(result: ScoreResult | None) -> str:
    if result is None:
        return "-"
    failed = f", {result.parse_failure_rate:.0%} unreadable" if result.n_unparsed else ""
    return f"acc {result.accuracy:.2f} F1 {result.f1:.2f} (n={result.n}{failed})"
