"""Named hook points on a model's own modules, and context managers to read or rewrite them.

A hook point is `KIND.LAYER` with KIND one of `resid_pre` (input of block LAYER), `attn_out` (what its
attention adds to the residual stream), `mlp_out` (what its MLP adds) and `resid_post` (output of the block).
They are resolved on the transformers modules themselves, so no architecture is re-implemented: the block
list is found as the model's ModuleList with one entry per layer, and the attention/MLP submodules by their
usual names. In post-norm layouts (Gemma 2/3, OLMo 2/3, GLM-4, EXAONE 4: a norm between each sub-block and
the residual add) `attn_out`/`mlp_out` are the outputs of those norms, as in TransformerLens and Gemma
Scope, so in every layout where the block is x + attn + mlp (sequential or parallel, dense or MoE),
resid_post.L = resid_pre.L + attn_out.L + mlp_out.L.

Hooks registered here are always removed when the `with` block ends, even on error (TransformerLens's
`hooks()` discipline), so a model never keeps a stale hook.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Union

import torch
from torch import nn

from ..errors import MonoscopeError

HOOK_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
# Norms applied to a sub-block's output before the residual add. `post_attention_layernorm` is one only in a
# block that also has an MLP post-norm (Gemma, OLMo 2): in Llama-style blocks it is the MLP's input norm.
_ATTN_POST_NORMS = ("post_self_attn_layernorm", "post_attn_layernorm")
_MLP_POST_NORMS = (
    "post_feedforward_layernorm",
    "post_mlp_layernorm",
    "post_ffw_layernorm",
    "post_ffn_layernorm",
    "post_ffn_norm",
    "post_mlp_norm",
)

# Other tools' names for the same sites: TransformerLens `blocks.L.hook_resid_post`, sparsify `layers.L`
# (a block's output), and plain module paths such as `model.layers.L`.
_ALIASES = [
    (re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$"), lambda m: (m[2], int(m[1]))),
    (re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)$"), lambda m: ("resid_post", int(m[1]))),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|attn|attention)$"), lambda m: ("attn_out", int(m[1]))),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp$"), lambda m: ("mlp_out", int(m[1]))),
]

EditFn = Callable[[torch.Tensor], "torch.Tensor | None"]
# Mapping is invariant in its keys: a dict keyed by str alone must be accepted as well as a mixed one.
EditFns = Union[Mapping[str, EditFn], Mapping["HookPoint", EditFn], Mapping[Union[str, "HookPoint"], EditFn]]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every activation needed has been read."""


@dataclass(frozen=True)
class HookPoint:
    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise MonoscopeError(
                f"unknown hook kind {self.kind!r}; use one of {', '.join(HOOK_KINDS)} (e.g. resid_post.6)"
            )
        if self.layer < 0:
            raise MonoscopeError(f"hook layer must be >= 0, got {self.layer}")

    @classmethod
    def parse(cls, name: "str | HookPoint") -> "HookPoint":
        if isinstance(name, HookPoint):
            return name
        text = str(name).strip()
        match = re.fullmatch(r"([a-z_]+)\.(\d+)", text)
        if match and match[1] in HOOK_KINDS:
            return cls(match[1], int(match[2]))
        for pattern, convert in _ALIASES:
            found = pattern.match(text)
            if found:
                kind, layer = convert(found)
                return cls(kind, layer)
        raise MonoscopeError(
            f"cannot read hook point {text!r}; write KIND.LAYER with KIND in {', '.join(HOOK_KINDS)}, e.g. resid_post.15"
        )

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass: by layer, then resid_pre < attn_out < mlp_out < resid_post."""
        return (self.layer, HOOK_KINDS.index(self.kind))

    @property
    def transformer_lens_name(self) -> str:
        """The same site as TransformerLens (and so SAELens's `hook_name`) names it: blocks.L.hook_KIND."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


def _n_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks: the first ModuleList of identical modules with one entry per layer."""
    cached = getattr(model, "_monoscope_blocks", None)
    if cached is not None:
        return cached
    n_layers = _n_layers(model)
    candidates = [
        module
        for _, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    chosen = None
    if n_layers is not None:
        chosen = next((m for m in candidates if len(m) == n_layers), None)
    if chosen is None and candidates:
        chosen = max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))
    if chosen is None:
        raise MonoscopeError(f"could not find the block list of {type(model).__name__}: no ModuleList of layers in it")
    object.__setattr__(model, "_monoscope_blocks", chosen)
    return chosen


def _child(block: nn.Module, names: Iterable[str], what: str) -> nn.Module:
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    children = ", ".join(name for name, _ in block.named_children())
    raise MonoscopeError(
        f"{type(block).__name__} has no {what} submodule among ({children}); this hook kind is not available for it"
    )


def _named_child(block: nn.Module, names: Iterable[str]) -> nn.Module | None:
    return next((child for name in names if isinstance(child := getattr(block, name, None), nn.Module)), None)


def post_norms(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(attention post-norm, MLP post-norm) of a block: the norms between each sub-block and the residual add."""
    mlp_norm = _named_child(block, _MLP_POST_NORMS)
    attn_norm = _named_child(block, _ATTN_POST_NORMS)
    if attn_norm is None and mlp_norm is not None:
        attn_norm = _named_child(block, ("post_attention_layernorm",))
    return attn_norm, mlp_norm


def is_post_norm(model: nn.Module) -> bool:
    """Whether the model normalises what its sub-blocks write before adding it to the residual stream."""
    return any(norm is not None for block in find_blocks(model) for norm in post_norms(block))


def resolve(model: nn.Module, point: "str | HookPoint") -> tuple[HookPoint, nn.Module, bool]:
    """(hook point, module to hook, whether it is a pre-hook on the module's input)."""
    hp = HookPoint.parse(point)
    blocks = find_blocks(model)
    if hp.layer >= len(blocks):
        raise MonoscopeError(
            f"hook point {hp} does not exist: the model has {len(blocks)} layers (0-{len(blocks) - 1})"
        )
    block = blocks[hp.layer]
    if hp.kind == "resid_pre":
        return hp, block, True
    if hp.kind == "resid_post":
        return hp, block, False
    attn_norm, mlp_norm = post_norms(block)
    if hp.kind == "attn_out":
        return hp, attn_norm or _child(block, _ATTENTION_NAMES, "attention"), False
    return hp, mlp_norm or _child(block, _MLP_NAMES, "MLP"), False


def parse_points(points: "str | HookPoint | Iterable[str | HookPoint]") -> list[HookPoint]:
    if isinstance(points, (str, HookPoint)):
        points = [points]
    parsed = [HookPoint.parse(p) for p in points]
    if not parsed:
        raise MonoscopeError("no hook point given")
    return list(dict.fromkeys(parsed))


def _hidden_from_output(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise MonoscopeError(f"cannot read a hidden-state tensor from a module output of type {type(output).__name__}")


def _replace_output(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    return type(output)([new, *output[1:]]) if isinstance(output, list) else (new, *output[1:])


def _hidden_from_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    raise MonoscopeError("cannot find the block input (hidden_states) in its call arguments")


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


@contextmanager
def edit(model: nn.Module, fns: EditFns) -> Iterator[None]:
    """Run `fn(activation)` at each hook point during any forward pass or `generate` call inside the block;
    a returned tensor replaces the activation (steering, splicing an SAE in). Always unhooks."""
    handles = []
    try:
        for point, fn in fns.items():
            _, module, is_pre = resolve(model, point)
            if is_pre:

                def pre_hook(module, args, kwargs, fn=fn):
                    new = fn(_hidden_from_input(args, kwargs))
                    return None if new is None else _replace_input(args, kwargs, new)

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def post_hook(module, args, output, fn=fn):
                    new = fn(_hidden_from_output(output))
                    return None if new is None else _replace_output(output, new)

                handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    model: nn.Module,
    points: "str | HookPoint | Iterable[str | HookPoint]",
    *,
    stop_early: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activations at `points` (dict keyed by `str(point)`), detached.

    With `stop_early`, the forward pass is cut right after the last of them is recorded: the layers after it
    never run and the `with` block ends there (its remaining statements are skipped), which is why a
    harvest at layer L of N costs about L/N of a full pass.
    """
    wanted = parse_points(points)
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> EditFn:
        def record(activation: torch.Tensor) -> None:
            store[name] = activation.detach()
            if stop_early and len(store) == len(wanted):
                raise StopForward
            return None

        return record

    with edit(model, {p: make(str(p)) for p in wanted}):
        try:
            yield store
        except StopForward:
            pass


def run_to(
    model: nn.Module,
    points: "str | HookPoint | Iterable[str | HookPoint]",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One forward pass that stops after the deepest of `points`; returns their activations."""
    with torch.inference_mode(), capture(model, points, stop_early=True) as store:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [str(p) for p in parse_points(points) if str(p) not in store]
    if missing:
        raise MonoscopeError(f"the forward pass never reached hook point(s) {', '.join(missing)}")
    return store
