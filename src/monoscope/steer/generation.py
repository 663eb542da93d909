"""Generating text with and without steering, through `transformers`' own `generate`.

A prompt goes through the model's chat template when it has one (unless `raw=True`); a model without one
gets the prompt exactly as `tokenizer(prompt)` encodes it, so unsteered output is plain `generate` output.
Greedy by default; `temperature > 0` samples (`seed` makes it reproducible). `streamer` takes a
`TextIteratorStreamer` or any transformers streamer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MonoscopeError
from .steering import Steering, steer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: str | list[dict], *, raw: bool = False, device: Any = "cpu") -> torch.Tensor:
    """Token ids [1, T] of a prompt (a string, or chat messages [{role, content}, ...])."""
    if isinstance(prompt, str) and not prompt.strip():
        raise MonoscopeError("the prompt is empty; give some text to continue")
    if not raw and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        if not isinstance(prompt, str):
            prompt = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in prompt) + "Assistant:"
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise MonoscopeError("the prompt encodes to no tokens; give some text to continue")
    return ids.to(device)


@dataclass
class Generation:
    text: str
    ids: list[int]
    prompt_ids: list[int]
    finish_reason: str = "length"  # stop (EOS or a stop string), length, error (see `generate_batch`)
    error: str | None = None


def generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None, seed: int | None = None) -> dict[str, Any]:
    if max_new_tokens <= 0:
        raise MonoscopeError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if seed is not None and not temperature:
        temperature = 1.0
    kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature))
        if top_p is not None:
            kw["top_p"] = float(top_p)
    else:
        kw.update(do_sample=False)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is not None:
        kw["pad_token_id"] = pad
    return kw


def generate(
    lm: Any,
    prompt: str | list[dict] | torch.Tensor,
    *,
    steering: Steering | None = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    raw: bool = False,
    streamer: Any = None,
    use_cache: bool = True,
) -> Generation:
    """Generate from a `LoadedModel` with `steering` applied (none: plain `generate`); returns the new text."""
    model, tokenizer = lm.model, lm.tokenizer
    ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt, raw=raw, device=lm.device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    kw = generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, seed)
    with steer(lm, steering) as handle:
        handle.begin(ids.shape[-1])
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, use_cache=use_cache, **kw)
    new = out[0, ids.shape[-1]:].tolist()
    eos = {t for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(t, int)}
    finish = "stop" if new and new[-1] in eos else "length"
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), ids=new, prompt_ids=ids[0].tolist(), finish_reason=finish)


def compare(lm: Any, prompt: str, steering: Steering, **kw: Any) -> tuple[Generation, Generation]:
    """(unsteered, steered) generations of the same prompt with the same settings and seed."""
    steering.compile(lm)  # fail on a bad spec before spending time on the unsteered run
    return generate(lm, prompt, steering=None, **kw), generate(lm, prompt, steering=steering, **kw)
