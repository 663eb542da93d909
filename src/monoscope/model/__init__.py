"""Stage 1: load a causal LM and address its activations by named hook points."""

from .hooks import (
    HOOK_KINDS,
    HookPoint,
    StopForward,
    capture,
    edit,
    find_blocks,
    is_post_norm,
    parse_points,
    post_norms,
    resolve,
    run_to,
)
from .loading import (
    EMBEDDED_MODEL,
    LoadedModel,
    ensure_embedded_checkpoint,
    ensure_gguf_checkpoint,
    load_model,
    resolve_device,
    resolve_dtype,
)
from .outputs import last_logits, token_logprobs

__all__ = [
    "EMBEDDED_MODEL",
    "HOOK_KINDS",
    "HookPoint",
    "LoadedModel",
    "StopForward",
    "capture",
    "edit",
    "ensure_embedded_checkpoint",
    "ensure_gguf_checkpoint",
    "find_blocks",
    "is_post_norm",
    "last_logits",
    "load_model",
    "parse_points",
    "post_norms",
    "resolve",
    "resolve_device",
    "resolve_dtype",
    "run_to",
    "token_logprobs",
]
