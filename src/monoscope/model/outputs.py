"""Logits without the [tokens, vocab] blow-up: a 262k vocabulary (Gemma 3) makes 1 MB of fp32 logits per
token, so scoring a few dozen sequences through the whole LM head costs gigabytes. These helpers ask the
model for the positions that are scored only (`logits_to_keep`, which every transformers causal LM takes)
and read log-probabilities as logit - logsumexp a few rows at a time, never a full log_softmax copy."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

_ROWS = 64  # positions whose logsumexp is taken at once: 64 x 262k fp32 = 64 MB of temporaries


def _keeps_logits(model: nn.Module) -> bool:
    cached = getattr(model, "_monoscope_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        object.__setattr__(model, "_monoscope_logits_to_keep", cached)
    return cached


def last_logits(model: nn.Module, input_ids: Tensor, n: int) -> Tensor:
    """Logits [B, n, vocab] of the last `n` positions of a forward pass over `input_ids` (no KV cache)."""
    n = max(1, min(int(n), input_ids.shape[1]))
    if _keeps_logits(model):
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=n).logits
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits
    return logits[:, -n:]


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for logits [..., vocab] and integer targets [...], in float32, `_ROWS` positions at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    index = targets.reshape(-1, 1).to(flat.device)
    picked = flat.gather(1, index).squeeze(1).float()
    norm = torch.cat([flat[lo : lo + _ROWS].float().logsumexp(-1) for lo in range(0, flat.shape[0], _ROWS)])
    return (picked - norm).reshape(targets.shape)
