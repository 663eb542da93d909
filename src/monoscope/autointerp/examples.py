"""Feature examples as auto-interp reads them from the feature store and shows them to an LLM.

An `Example` is a list of token strings with the feature's activation on each: a `FeatureStore` row, a
dict, or anything else with `.tokens` and `.activations`. The explainer sees firing tokens marked
`<<like this>>`; the judges see held-out excerpts that `split_examples` keeps apart from the explainer's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence, Union

from ..errors import MonoscopeError


class ExampleLike(Protocol):
    """What a feature store hands out: `monoscope.features.store.Example` and the like."""

    @property
    def tokens(self) -> Sequence[str]: ...

    @property
    def activations(self) -> Sequence[float]: ...


ExampleSource = Union["Example", ExampleLike, Mapping[str, Sequence[object]]]


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
    def of(cls, obj: ExampleSource) -> Example:
        """An `Example` from anything with `.tokens` and `.activations` (a store row, a dict, an Example)."""
        if isinstance(obj, Example):
            return obj
        if isinstance(obj, Mapping):
            return cls(list(obj["tokens"]), list(obj["activations"]))  # type: ignore[arg-type] - converted in __post_init__
        return cls(list(obj.tokens), list(obj.activations))

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def fires(self) -> bool:
        return self.max_activation > 0

    def window(self, size: int) -> Example:
        """At most `size` tokens around the strongest activation (three quarters of them before it)."""
        if size <= 0 or len(self.tokens) <= size:
            return self
        peak = max(range(len(self.activations)), key=self.activations.__getitem__)
        start = max(0, min(peak - (3 * size) // 4, len(self.tokens) - size))
        return Example(self.tokens[start : start + size], self.activations[start : start + size])


def examples_of(items: Iterable[ExampleSource] | None) -> list[Example]:
    return [Example.of(x) for x in (items or [])]


# ---------------------------------------------------------------- how an LLM sees them


def show_token(token: str) -> str:
    """A token on one line of a prompt (newlines written as \\n)."""
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
        out.append(show_token(token))
    if inside:
        out.append(">>")
    return "".join(out)


def plain(tokens: Sequence[str]) -> str:
    return "".join(show_token(t) for t in tokens)


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)


def strip_reasoning(text: str) -> str:
    """An LLM's answer without `<think>...</think>` blocks (reasoning models)."""
    return _THINK.sub("", text or "").strip()


# ---------------------------------------------------------------- held-out split


@dataclass
class ExampleSplit:
    """Excerpts for the explainer, and disjoint held-out excerpts for scoring."""

    explain: list[Example]
    activating: list[Example]  # held out, firing
    non_activating: list[Example]  # held out, not firing


def split_examples(
    top: Sequence[ExampleSource],
    quantile: Sequence[ExampleSource] = (),
    random_examples: Sequence[ExampleSource] = (),
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
    for example in _interleave(tops[n_top:], rest_quant):
        if example.text not in seen:
            seen.add(example.text)
            held.append(example)
    if not held and len(shown) >= 4:
        # Nothing left over (a small store): score on every other shown excerpt rather than not at all.
        held, shown = shown[1::2], shown[::2]
    negatives = []
    for e in examples_of(random_examples):
        if not e.fires and e.text not in seen:
            seen.add(e.text)
            negatives.append(e)
    rng.shuffle(negatives)
    return ExampleSplit(explain=shown, activating=held[:n_held_out], non_activating=negatives[:n_non_activating])


def _interleave(a: Sequence[Example], b: Sequence[Example]) -> Iterable[Example]:
    for i in range(max(len(a), len(b))):
        if i < len(b):
            yield b[i]
        if i < len(a):
            yield a[i]
