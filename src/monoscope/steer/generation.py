"""Generating text with and without steering, through `transformers`' own `generate` (many prompts at once,
each with its own steering: `generate_batch` in batch.py).

Prompts are encoded by `runtime.encode_prompt` (the chat template when the model has one, unless `raw=True`;
a model without one gets the prompt exactly as `tokenizer(prompt)` encodes it, so unsteered output is plain
`generate` output). Greedy by default; `temperature > 0` samples (`seed` makes it reproducible). `streamer`
takes a `TextIteratorStreamer` or any transformers streamer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import torch

from .batch import generate_batch
from .runtime import Generation, Prompt, context_length, decode_text, encode_prompt, fit_context, generation_kwargs
from .steering import Steering, steer

if TYPE_CHECKING:
    from transformers.generation.streamers import BaseStreamer

    from ..model import LoadedModel

__all__ = ["Generation", "compare", "encode_prompt", "generate"]


class _Generates(Protocol):
    """transformers' `GenerationMixin.generate` (its decorators hide it from type checkers)."""

    def generate(self, inputs: torch.Tensor, **kwargs: object) -> torch.Tensor: ...


def generate(
    lm: LoadedModel,
    prompt: Prompt | torch.Tensor,
    *,
    steering: Steering | None = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    raw: bool = False,
    streamer: BaseStreamer | None = None,
    use_cache: bool = True,
) -> Generation:
    """Generate from a `LoadedModel` with `steering` applied (none: plain `generate`); returns the new text."""
    model, tokenizer = lm.model, lm.tokenizer
    ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt, raw=raw, device=lm.device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    kw = generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, seed)
    fit_context(ids[0].tolist(), max_new_tokens, context_length(model))
    with steer(lm, steering) as handle:
        handle.begin(ids.shape[-1])
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = cast(_Generates, model).generate(
                ids, attention_mask=torch.ones_like(ids), streamer=streamer, use_cache=use_cache, **kw
            )
    new = out[0, ids.shape[-1] :].tolist()
    eos = {
        t
        for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
        if isinstance(t, int)
    }
    finish = "stop" if new and new[-1] in eos else "length"
    return Generation(text=decode_text(tokenizer, new), ids=new, prompt_ids=ids[0].tolist(), finish_reason=finish)


def compare(lm: LoadedModel, prompt: Prompt, steering: Steering, **kw: object) -> tuple[Generation, Generation]:
    """(unsteered, steered) generations of the same prompt with the same settings and seed: two rows of one
    batch (`generate_batch`), so the pair costs little more than one; greedy, each equals `generate` alone."""
    if "streamer" in kw or "use_cache" in kw:  # transformers' own generate, one after the other
        steering.compile(lm)  # fail on a bad spec before spending time on the unsteered run
        return generate(lm, prompt, steering=None, **kw), generate(lm, prompt, steering=steering, **kw)  # type: ignore[arg-type]
    unsteered, steered = generate_batch(lm, [prompt, prompt], steerings=[None, steering], **kw)  # type: ignore[arg-type]
    return unsteered, steered
