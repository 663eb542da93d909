"""The explainer: an LLM reads a feature's firing excerpts and says in one line what the feature detects.

It sees ~10 top-activating and ~5 quantile-sampled excerpts with the firing tokens marked `<<like this>>` and
their activations on a 0-10 scale (as in Bills et al. 2023, EleutherAI's delphi and Neuronpedia's
auto-interp) and answers with one line `[EXPLANATION]: ...`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import MonoscopeError
from .client import LLMClient, Usage
from .config import ExplainConfig
from .examples import Example, ExampleSource, examples_of, highlight, show_token, strip_reasoning


def activation_levels(example: Example, scale: float) -> list[int]:
    """Activations on a 0-10 scale relative to `scale` (the strongest activation shown); firing tokens get at
    least 1."""
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
        listed = ", ".join(
            f'"{show_token(example.tokens[i]).strip() or show_token(example.tokens[i])}" {lv}' for i, lv in firing
        )
        lines.append(f"Activations: {listed}")
    return "\n".join(lines)


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


def explainer_prompt(examples: Sequence[ExampleSource], *, context: int = 64) -> list[dict[str, str]]:
    """The chat messages that ask for an explanation of the feature firing on `examples`."""
    shown = [Example.of(e).window(context) for e in examples]
    scale = max((e.max_activation for e in shown), default=1.0)
    body = "\n\n".join(format_explainer_example(e, i + 1, scale) for i, e in enumerate(shown))
    user = (
        f"Excerpts where the feature fires:\n\n{body}\n\n"
        f"What does the feature detect? End with the line [EXPLANATION]: ..."
    )
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


_MARKER = re.compile(r"\[?\s*explanation\s*\]?\s*[:：\-]\s*(.*)", re.I)
_LEADING = re.compile(r"^(?:[-*>#\s]+|\d+[.)]\s+)")
_MAX_EXPLANATION = 200


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
    lines = strip_reasoning(text).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = _MARKER.search(lines[i])
        if match and (i == 0 or "explanation" in lines[i].lower()):
            rest = _clean(match.group(1))
            if not rest:  # the answer is on the next line
                rest = next((c for c in (_clean(x) for x in lines[i + 1 :]) if c), "")
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


def explain_examples(
    client: LLMClient, examples: Sequence[ExampleSource], *, config: ExplainConfig | None = None
) -> Explanation:
    """Ask the explainer LLM what `examples` (firing excerpts) have in common; raise `ExplanationError` when
    its answer holds no explanation, `LLMError` when the endpoint fails."""
    cfg = config or ExplainConfig()
    shown = examples_of(examples)
    if not shown:
        raise ExplanationError("no firing examples to explain")
    result = client.chat(
        explainer_prompt(shown, context=cfg.context), max_tokens=cfg.explain_max_tokens, temperature=cfg.temperature
    )
    text, strict = parse_explanation(result.text)
    if text is None:
        raise ExplanationError(f"the explainer's answer held no explanation: {result.text[:80]!r}")
    return Explanation(text=text, strict=strict, raw=result.text, usage=result.usage)
