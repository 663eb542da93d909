"""Directional ablation (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

Hooked: x' = x - (x.r) r for unit r at every residual-stream site of every layer and position: each block's
input (resid_pre.L) and what its attention and MLP write (attn_out.L, mlp_out.L), so no component along r
ever enters the stream. In post-norm families (Gemma 2/3, OLMo 2: sub-block outputs normalised before the
residual add) attn_out/mlp_out are the normalised outputs, i.e. what is actually added, so the hooked form
is exact there too.

Baked in (`orthogonalize_weights`): the same model with every matrix that writes into the residual stream
replaced by W - r r^T W (its outputs lose their r component): token (and, for GPT-2, position) embeddings,
attention output projections and MLP down projections, with their biases. A tied LM head is untied first
and keeps the original embedding, because the unembedding reads the stream after the final norm, whose
gain can put an r component back. MoE blocks have every expert's down projection (and a shared expert's)
orthogonalised. The result is a plain transformers checkpoint (`save_orthogonalized`) that behaves like the
hooked model in any tool, llama.cpp included after conversion. Post-norm families are refused: a norm after
the output projection rescales its output per token and puts back what the weights removed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor, nn

from ..errors import MonoscopeError
from ..model import LoadedModel, edit, find_blocks, is_post_norm

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_ATTN_OUT = ("o_proj", "out_proj", "c_proj", "dense", "wo")
_MLP_OUT = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo", "fc_out")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")
HOOKED_HINT = (
    "apply it at run time instead: `monoscope steer --ablate-direction FILE` or "
    "`monoscope serve --ablate-direction FILE` (preview with `ablate-direction --prompt`)"
)


def unit(direction: Tensor, width: int | None = None) -> Tensor:
    r = torch.as_tensor(direction).detach().float().flatten()
    if width is not None and r.numel() != width:
        raise MonoscopeError(
            f"the direction has {r.numel()} numbers but the model's width is {width}; it was made for another model"
        )
    if not torch.isfinite(r).all() or r.norm() <= 1e-12:
        raise MonoscopeError("the direction to ablate is zero or has NaN/inf entries")
    return r / r.norm()


def _width(model: nn.Module) -> int:
    from .steering import model_width

    width = model_width(model)
    if width is None:
        raise MonoscopeError(f"cannot tell the hidden size of {type(model).__name__}")
    return width


def check_bakeable(model: nn.Module) -> None:
    if is_post_norm(model):
        model_type = getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__
        raise MonoscopeError(
            f"cannot bake the ablation into {model_type} weights: it normalises attention/MLP outputs before the residual add, "
            f"so no weight edit removes the direction exactly; {HOOKED_HINT}"
        )


def ablation_points(model: nn.Module) -> list[str]:
    n = len(find_blocks(model))
    points = []
    for layer in range(n):
        points += [f"resid_pre.{layer}", f"attn_out.{layer}", f"mlp_out.{layer}"]
    return points + [f"resid_post.{n - 1}"]


@contextmanager
def directional_ablation(model: nn.Module | LoadedModel, direction: Tensor) -> Iterator[None]:
    """Project `direction` out of the residual stream everywhere during forward passes inside the block."""
    module = model if isinstance(model, nn.Module) else model.model
    r = unit(direction, _width(module)).to(next(module.parameters()).device)

    def project(x: Tensor) -> Tensor:
        rr = r.to(x.dtype)
        return x - (x @ rr).unsqueeze(-1) * rr

    with edit(module, {p: project for p in ablation_points(module)}):
        yield


# ---------------------------------------------------------------- weight orthogonalisation


def _writer(parent: nn.Module, names: tuple[str, ...], what: str, layer: int) -> nn.Module:
    for name in names:
        child = getattr(parent, name, None)
        if isinstance(child, nn.Module) and hasattr(child, "weight"):
            return child
    raise MonoscopeError(
        f"layer {layer}: cannot find the {what} output projection among {', '.join(n for n, _ in parent.named_children())}; this architecture is not supported"
    )


def _child(block: nn.Module, names: tuple[str, ...], what: str, layer: int) -> nn.Module:
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise MonoscopeError(f"layer {layer}: cannot find the {what} module; this architecture is not supported")


def _weight(module: nn.Module) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise MonoscopeError(f"cannot orthogonalise a {type(module).__name__}: it has no weight tensor")
    return weight


@torch.no_grad()
def _orthogonalize_output(module: nn.Module, r: Tensor, width: int) -> None:
    """Make the outputs of a Linear ([out, in]) or GPT-2 Conv1D ([in, out]) orthogonal to r, bias included."""
    w = _weight(module)
    rr = r.to(device=w.device, dtype=torch.float32)
    if isinstance(module, nn.Linear) or (w.shape[0] == width and w.shape[1] != width):
        if w.shape[0] != width:
            raise MonoscopeError(f"{type(module).__name__} writes {w.shape[0]} features, not the model width {width}")
        wf = w.float()
        w.copy_((wf - torch.outer(rr, rr @ wf)).to(w.dtype))
    elif w.shape[-1] == width:  # Conv1D: y = x @ W + b, W [in, out]
        wf = w.float()
        w.copy_((wf - torch.outer(wf @ rr, rr)).to(w.dtype))
    else:
        raise MonoscopeError(f"cannot orthogonalise a {type(module).__name__} with weight {tuple(w.shape)}")
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias is not None:
        bf = bias.float()
        bias.copy_((bf - (bf @ rr) * rr).to(bias.dtype))


@torch.no_grad()
def orthogonalize_weights(model: PreTrainedModel, direction: Tensor) -> PreTrainedModel:
    """Rewrite `model` in place so nothing it writes into the residual stream has a component along `direction`."""
    check_bakeable(model)
    width = _width(model)
    r = unit(direction, width)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and _weight(out) is _weight(inp):  # untie: the LM head keeps reading the original embedding
        out.weight = nn.Parameter(_weight(inp).detach().clone(), requires_grad=False)
        cfg = model.config
        cfg.tie_word_embeddings = False
        if hasattr(cfg, "get_text_config") and cfg.get_text_config() is not cfg:
            cfg.get_text_config().tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            try:  # empty, of the type this transformers version uses (a list in 4.x, a dict in 5.x)
                model._tied_weights_keys = type(model._tied_weights_keys)()
            except (AttributeError, TypeError):  # read-only here, or not a plain container: nothing to untie
                pass
    embeds = [inp]
    for name in ("wpe", "embed_positions", "position_embeddings"):  # learned absolute positions (GPT-2 & co)
        for mod_name, mod in model.named_modules():
            if mod_name.endswith(name) and isinstance(mod, nn.Embedding) and mod.weight.shape[-1] == width:
                embeds.append(mod)
    for emb in embeds:
        w = _weight(emb)
        wf = w.float()
        rr = r.to(w.device)
        w.copy_((wf - torch.outer(wf @ rr, rr)).to(w.dtype))
    for layer, block in enumerate(find_blocks(model)):
        attn = _child(block, _ATTN_NAMES, "attention", layer)
        mlp = _child(block, _MLP_NAMES, "MLP", layer)
        _orthogonalize_output(_writer(attn, _ATTN_OUT, "attention", layer), r, width)
        experts = getattr(mlp, "experts", None)
        if experts is None:
            _orthogonalize_output(_writer(mlp, _MLP_OUT, "MLP", layer), r, width)
            continue
        if isinstance(experts, nn.ModuleList):
            for expert in experts:
                _orthogonalize_output(_writer(expert, _MLP_OUT, "expert", layer), r, width)
        else:
            _orthogonalize_experts(experts, r, width, layer)
        for name in _SHARED_EXPERTS:
            shared = getattr(mlp, name, None)
            if isinstance(shared, nn.Module):
                _orthogonalize_output(_writer(shared, _MLP_OUT, "shared expert", layer), r, width)
    return model


@torch.no_grad()
def _orthogonalize_experts(experts: nn.Module, r: Tensor, width: int, layer: int) -> None:
    """Fused experts: a `down_proj` Parameter [experts, d_model, d_ff] (F.linear's layout) or [experts, d_ff, d_model]."""
    w = getattr(experts, "down_proj", None)
    if not isinstance(w, Tensor) or w.dim() != 3 or width not in w.shape[1:] or w.shape[1] == w.shape[2]:
        raise MonoscopeError(
            f"layer {layer}: cannot tell how {type(experts).__name__} writes to the residual stream; baking is not supported for it (the hooked form is)"
        )
    rr = r.to(device=w.device, dtype=torch.float32)
    wf = w.float()
    if w.shape[1] == width:  # y = W_e x
        w.copy_((wf - rr.view(1, -1, 1) * torch.einsum("d,edf->ef", rr, wf).unsqueeze(1)).to(w.dtype))
    else:  # y = x W_e
        w.copy_((wf - (wf @ rr).unsqueeze(-1) * rr).to(w.dtype))
    bias = getattr(experts, "down_proj_bias", None)
    if isinstance(bias, Tensor) and bias.shape[-1] == width:
        bf = bias.float()
        bias.copy_((bf - (bf @ rr).unsqueeze(-1) * rr).to(bias.dtype))


def save_orthogonalized(
    lm: LoadedModel, direction: Tensor, out: str | os.PathLike, *, note: dict | None = None
) -> Path:
    """Write a copy of `lm`'s model with `direction` orthogonalised out of its weights, plus its tokenizer."""
    import copy
    import json

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MonoscopeError(f"{out} exists and is not empty; choose a new folder for the ablated model")
    model = copy.deepcopy(lm.model)
    orthogonalize_weights(model, direction)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    (out / "monoscope-ablation.json").write_text(
        json.dumps(
            {
                "base_model": getattr(lm, "name", None),
                "method": "weight orthogonalisation (directional ablation)",
                **(note or {}),
            },
            indent=2,
        )
        + "\n"
    )
    return out


def load_direction(spec: str, width: int | None = None) -> tuple[str, Tensor]:
    """`FILE` or `FILE:HOOK` (a vector from `monoscope vector make`) -> (description, unit direction), checked
    against the model's width: the right size, finite, not zero."""
    from .vectors import SteeringVector

    path, hook = spec, None
    if not Path(spec).exists() and ":" in spec:
        path, _, hook = spec.rpartition(":")
    vector = SteeringVector.load(path)
    if not hook and len(vector.hooks) > 1:
        raise MonoscopeError(f"{path} holds directions at {', '.join(vector.hooks)}; pick one as {path}:HOOK")
    hook, direction = vector.direction(hook or None)
    return f"{Path(path).name} ({hook})", unit(direction, width)
