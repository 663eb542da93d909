"""What every way of running the model shares: prompt encoding (chat template or not), generation settings,
the context-length check and the result of one generation.

`generate` (transformers' own loop, generation.py), the batched engine (batch.py) and the HTTP server all
encode prompts, validate sampling settings and check the context length here, so a prompt reads the same
to the model, and fails with the same message, whichever way it is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

import torch

from ..errors import MonoscopeError
from .spec import check_number

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ChatMessages = Sequence[dict[str, str]]
Prompt = Union[str, ChatMessages]
"""A prompt: text, or chat messages `[{"role": ..., "content": ...}, ...]`."""

CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length")


class ContextLengthExceeded(MonoscopeError):
    """The prompt and the tokens to generate do not fit in the model's context."""


# ---------------------------------------------------------------- prompts


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def transcript(messages: ChatMessages) -> str:
    """Chat messages as plain text for a model without a chat template, ending where the assistant speaks."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, *, raw: bool = False, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Token ids [1, T] of a prompt (a string, or chat messages [{role, content}, ...]).

    Through the model's chat template when it has one (unless `raw`); otherwise text is encoded exactly as
    `tokenizer(prompt)` does (so unsteered output is plain `generate` output) and messages as a `transcript`.
    """
    if isinstance(prompt, str) and not prompt.strip():
        raise MonoscopeError("the prompt is empty; give some text to continue")
    if not raw and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        text = prompt if isinstance(prompt, str) else transcript(prompt)
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise MonoscopeError("the prompt encodes to no tokens; give some text to continue")
    return ids.to(device)


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt | Sequence[int] | torch.Tensor, *, raw: bool = False
) -> list[int]:
    """The token ids of a prompt given as text, chat messages, token ids or a tensor of them."""
    if isinstance(prompt, torch.Tensor):
        return [int(t) for t in prompt.flatten().tolist()]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return [t for t in prompt if isinstance(t, int)]
    return encode_prompt(tokenizer, prompt, raw=raw)[0].tolist()  # type: ignore[arg-type] - text or messages here


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The text of generated token ids (special tokens left out)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


# ---------------------------------------------------------------- the context


def context_length(model: PreTrainedModel | torch.nn.Module) -> int | None:
    """The longest sequence the model's positions cover (None when its config does not say)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in CONTEXT_ATTRIBUTES:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_context(ids: list[int], max_new_tokens: int, limit: int | None, *, truncate: bool = False) -> list[int]:
    """`ids`, checked to leave room for `max_new_tokens` in a context of `limit` tokens; with `truncate`, a
    prompt that is too long keeps its last tokens instead of raising `ContextLengthExceeded`."""
    if limit is None or len(ids) + max_new_tokens <= limit:
        return ids
    room = limit - max_new_tokens
    if not truncate or room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} and "
            f"max_tokens is {max_new_tokens}: shorten the prompt or lower max_tokens"
        )
    return ids[-room:]


# ---------------------------------------------------------------- generation settings


def sampling_temperature(temperature: float | None, seed: int | None) -> float:
    """The temperature a request samples at: a seed alone samples at temperature 1 (greedy needs no seed)."""
    if seed is not None and not temperature:
        return 1.0
    return float(temperature or 0.0)


@dataclass
class SamplingParams:
    """How one generation samples and when it ends. Greedy at temperature 0; `min_new_tokens` keeps EOS away."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) <= 0:
            raise MonoscopeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        self.max_new_tokens = int(self.max_new_tokens)
        self.temperature = check_number(self.temperature, "temperature")
        if self.temperature < 0:
            raise MonoscopeError(f"temperature must be >= 0, got {self.temperature:g}")
        if self.top_p is not None and not 0 < check_number(self.top_p, "top_p") <= 1:
            raise MonoscopeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and int(self.top_k) < 0:
            raise MonoscopeError(f"top_k must be >= 0, got {self.top_k}")
        self.stop = tuple(s for s in self.stop if s)
        self.min_new_tokens = max(0, min(int(self.min_new_tokens), self.max_new_tokens))

    def hf_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
        """These settings as keyword arguments of transformers' `generate` (stop strings are not passed)."""
        kw: dict[str, object] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kw["top_p"] = float(self.top_p)
            if self.top_k:
                kw["top_k"] = int(self.top_k)
        else:
            kw.update(do_sample=False)
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is not None:
            kw["pad_token_id"] = pad
        return kw


def generation_kwargs(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
) -> dict[str, object]:
    """Keyword arguments of transformers' `generate` for these settings (a seed alone samples at temperature 1)."""
    temperature = max(0.0, sampling_temperature(temperature, seed))
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed).hf_kwargs(
        tokenizer
    )


# ---------------------------------------------------------------- the result


@dataclass
class Generation:
    """The new text of one generation, its token ids and its prompt's."""

    text: str
    ids: list[int]
    prompt_ids: list[int]
    finish_reason: str = "length"  # stop (EOS or a stop string), length, error (see `generate_batch`)
    error: str | None = None
