"""Terminal rendering of features, search results and scans.

Activations are shown as background colours (256-colour ANSI, stronger = more orange) when writing to a
terminal that allows colour (not when NO_COLOR is set), and as [brackets] around firing tokens otherwise.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from typing import TYPE_CHECKING, Sequence, TextIO

from .store import Example, FeatureRecord, FeatureStore

if TYPE_CHECKING:
    from .family import Family
    from .scan import ScanResult
    from .search import ExampleHit, SearchHit

SPARK = "▁▂▃▄▅▆▇█"
_LEVELS = (230, 229, 228, 221, 214, 208)  # light yellow -> orange backgrounds
_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"


def use_colour(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def terminal_width() -> int:
    return max(60, shutil.get_terminal_size((100, 24)).columns)


def show_piece(token: str) -> str:
    return token.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def highlight(tokens: Sequence[str], activations: Sequence[float], scale: float, colour: bool) -> str:
    """Tokens joined, firing ones coloured by activation / scale (or in [brackets])."""
    scale = scale if scale > 0 else max([a for a in activations if a > 0], default=1.0)
    out = []
    inside = False
    for token, act in zip(tokens, activations):
        piece = show_piece(token)
        if colour:
            if act > 0:
                level = min(len(_LEVELS) - 1, int(len(_LEVELS) * act / scale))
                out.append(f"\033[48;5;{_LEVELS[level]}m\033[38;5;16m{piece}{_RESET}")
            else:
                out.append(piece)
            continue
        if act > 0 and not inside:
            out.append("[")
            inside = True
        elif act <= 0 and inside:
            out.append("]")
            inside = False
        out.append(piece)
    if inside:
        out.append("]")
    return "".join(out)


def sparkline(counts: Sequence[int]) -> str:
    """Unicode bars, heights on a log scale so the tails show."""
    if not counts:
        return ""
    logs = [math.log1p(c) for c in counts]
    top = max(logs) or 1.0
    return "".join(
        " " if c == 0 else SPARK[min(len(SPARK) - 1, int((len(SPARK) - 1) * v / top + 0.5))]
        for c, v in zip(counts, logs)
    )


def fmt_density(d: float | None) -> str:
    if d is None:
        return "-"
    if d == 0:
        return "0"
    return f"{100 * d:.3g}%"


def fmt_num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _title(text: str, colour: bool) -> str:
    return f"{_BOLD}{text}{_RESET}" if colour else text


def _trim(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def render_examples(examples: Sequence[Example], scale: float, colour: bool, width: int) -> list[str]:
    lines = []
    for e in examples:
        tag = f"q{e.bin}" if e.kind == "quantile" and e.bin is not None else f"#{e.rank + 1}"
        head = f"  {tag:>4} {fmt_num(e.max_activation):>7}  "
        body = highlight(e.tokens, e.activations, scale, colour)
        lines.append(head + body)
    return lines


def render_feature(
    store: FeatureStore,
    feature_id: int,
    *,
    colour: bool = False,
    n_examples: int = 5,
    quantiles: bool = True,
    width: int | None = None,
) -> str:
    width = width or terminal_width()
    rec: FeatureRecord = store.feature(feature_id)
    lines = [_title(f"feature {rec.id}", colour) + f"  {store.meta.get('model')} @ {store.meta.get('hook_point')}"]
    score = store.label_scores([rec.id]).get(rec.id)
    held = " held-out" if (rec.label_source or "").startswith("heuristic") else ""
    lines.append(
        f"  label    {rec.label or '-'}"
        + (
            f"  ({rec.label_source}" + (f", embedding score{held} {score:.2f})" if score is not None else ")")
            if rec.label_source
            else ""
        )
    )
    lines.append(
        f"  density  {fmt_density(rec.density)} of {store.tokens_analysed:,} tokens ({rec.n_active:,}), in {rec.n_contexts:,} contexts"
        f"   mean {fmt_num(rec.mean_activation)}   max {fmt_num(rec.max_activation)}"
    )
    edges, counts = store.histogram(rec.id)
    if counts:
        lines.append(
            f"  histogram  {fmt_num(edges[0])} {sparkline(counts)} {fmt_num(edges[-1])}  (log-spaced bins, log counts)"
        )
    effects = store.logit_effects(rec.id)
    if effects["up"]:
        lines.append(
            "  promotes   "
            + _trim("  ".join(f"{show_piece(t.token)!r} {t.value:+.3g}" for t in effects["up"]), width - 13)
        )
        lines.append(
            "  suppresses "
            + _trim("  ".join(f"{show_piece(t.token)!r} {t.value:+.3g}" for t in effects["down"]), width - 13)
        )
    if rec.dead:
        lines.append("  (this feature never fired on the analysed tokens)")
    else:
        top = store.examples(rec.id, "top", limit=n_examples)
        lines.append(_title("top activations", colour))
        lines.extend(render_examples(top, rec.max_activation, colour, width))
        if quantiles:
            q = store.examples(rec.id, "quantile")
            if q:
                by_bin: dict[int, Example] = {}
                for e in q:
                    by_bin.setdefault(e.bin if e.bin is not None else 0, e)
                lines.append(_title("across the activation range (one per quantile bin, highest first)", colour))
                lines.extend(
                    render_examples(
                        [by_bin[b] for b in sorted(by_bin, reverse=True)], rec.max_activation, colour, width
                    )
                )
    neighbours = store.neighbours(rec.id)
    if neighbours:
        lines.append(_title("nearest features (decoder cosine)", colour))
        for n in neighbours:
            lines.append(_trim(f"  {n.id:>7} {n.cosine:+.3f}  {n.label or '-'}", width))
    labels = store.labels(rec.id)
    if len(labels) > 1:
        lines.append(_title("labels", colour))
        for lab in labels:
            scores = "  ".join(
                f"{k} {fmt_num(getattr(lab, k))}"
                for k in ("detection", "fuzzing", "embedding_score")
                if getattr(lab, k) is not None
            )
            lines.append(_trim(f"  [{lab.source}] {lab.text}" + (f"   ({scores})" if scores else ""), width))
    return "\n".join(lines)


def render_search(hits: Sequence[SearchHit], width: int | None = None) -> str:
    width = width or terminal_width()
    if not hits:
        return "no matching features"
    lines = [f"{'feature':>8}  {'score':>6}  {'density':>8}  {'max':>6}  {'holds':>5}  label"]
    for h in hits:
        holds = "-" if h.label_score is None else f"{h.label_score:.2f}"
        lines.append(
            _trim(
                f"{h.feature_id:>8}  {h.score:>6.3f}  {fmt_density(h.density):>8}  {fmt_num(h.max_activation):>6}  {holds:>5}  {h.label or '-'}",
                width,
            )
        )
    return "\n".join(lines)


def render_example_hits(hits: Sequence[ExampleHit], width: int | None = None) -> str:
    width = width or terminal_width()
    if not hits:
        return "no feature fires on the examples"
    lines = [f"{'feature':>8}  {'score':>6}  {'mean':>7}  {'base':>7}  {'fires':>5}  label"]
    for h in hits:
        lines.append(
            _trim(
                f"{h.feature_id:>8}  {h.score:>6.3f}  {h.example_mean:>7.3g}  {h.baseline_mean:>7.3g}  "
                f"{100 * h.fired_in:>4.0f}%  {h.label or '-'}",
                width,
            )
        )
    return "\n".join(lines)


def render_scan(result: ScanResult, colour: bool = False, width: int | None = None) -> str:
    width = width or terminal_width()
    lines = []
    for t in result.tokens:
        feats = "  ".join(
            f"{h.id}:{h.activation:.3g}" + (f" {_trim(h.label, 40)}" if h.label else "") for h in t.features[:3]
        )
        lines.append(_trim(f"{t.position:>4} {show_piece(t.token)!r:<14} {feats or '-'}", width))
    if result.top:
        lines.append(_title("strongest features", colour))
        for f in result.top:
            lines.append(
                _trim(f"  {f.id:>7}  max {f.max_activation:.3g} on {f.n_tokens} token(s)  {f.label or '-'}", width)
            )
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_family(family: Family) -> str:
    """A feature's family in other SAEs: one table per SAE, best decoder cosine first."""
    head = f"feature #{family.feature} of {family.sae}" + (f": {family.label}" if family.label else "")
    lines = [head]
    if family.coactivation_tokens:
        lines.append(f"co-activation: Pearson r on {family.coactivation_tokens:,} analysed tokens of its examples")
    else:
        lines.append("co-activation: not measured (no feature database for the SAE, or --no-coactivation)")
    for part in family.across:
        lines.append("")
        lines.append(f"in {part.sae} ({part.d_sae:,} features):")
        lines.append(f"  {'feature':>8}  {'cosine':>6}  {'coact':>6}  {'density':>8}  label")
        for m in part.matches:
            coact = "" if m.coactivation is None else f"{m.coactivation:6.2f}"
            density = "" if m.density is None else f"{m.density:8.2e}"
            lines.append(f"  {'#' + str(m.feature):>8}  {m.cosine:6.2f}  {coact:>6}  {density:>8}  {m.label or ''}")
    return "\n".join(lines)
