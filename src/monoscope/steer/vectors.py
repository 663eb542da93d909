"""Steering vectors: contrastive directions (difference of mean activations between two prompt sets), saved
as safetensors + JSON, added during generation, and exported as llama.cpp control vectors (GGUF).

    v = contrastive_vector(lm, ["I love this!", ...], ["I hate this.", ...], hooks=["resid_post.15"])
    v.save("runs/love.safetensors")                      # + runs/love.json
    print(generate(lm, "Tell me about your day.", steering=Steering().add_vector(v, 4.0)).text)
    export_gguf(v, "runs/love.gguf")                     # llama-cli --control-vector runs/love.gguf

Units: coefficient 1 adds the full mean difference, i.e. moves the average negative prompt's activation to
the average positive one's at that hook point.

llama.cpp's control-vector format (read in `common_control_vector_load_one`, applied in
`llama_adapter_cvec`): a GGUF with `general.architecture = controlvector`, `controlvector.model_hint` (the
model type, e.g. `llama`), `controlvector.layer_count`, and one F32 tensor `direction.N` per layer. The
vector `direction.N` is added to the output of block N (0-based), i.e. monoscope's `resid_post.N`; N starts
at 1 (block 0's output cannot be steered there), so `resid_pre.N` maps to `direction.(N-1)`. This is also
what `repeng`'s `export_gguf` writes (its layer i is hidden_states[i + 1], the output of block i).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from .._io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, read_json
from ..errors import MonoscopeError
from ..model import HookPoint, LoadedModel, find_blocks, run_to

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = "monoscope-steering-vector/1"
POSITION_MODES = ("last", "mean")


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


@dataclass
class SteeringVector:
    """One direction per hook point ({`resid_post.12`: tensor [d_model]}), with where it came from."""

    directions: dict[str, torch.Tensor]
    model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.directions:
            raise MonoscopeError("a steering vector needs at least one hook point")
        clean = {}
        for hook, tensor in self.directions.items():
            t = torch.as_tensor(tensor).detach().float().flatten().cpu()
            if t.numel() == 0 or not torch.isfinite(t).all():
                raise MonoscopeError(f"the steering vector at {hook} is empty or has NaN/inf entries")
            clean[str(HookPoint.parse(hook))] = t
        self.directions = clean

    @property
    def hooks(self) -> list[str]:
        return list(self.directions)

    def direction(self, hook: str | None = None) -> tuple[str, torch.Tensor]:
        """(hook, vector) for `hook`, or the only one when the vector has a single hook point."""
        if hook is None:
            if len(self.directions) != 1:
                raise MonoscopeError(
                    f"the vector has several hook points ({', '.join(self.hooks)}); say which one (--hook)"
                )
            return next(iter(self.directions.items()))
        key = str(HookPoint.parse(hook))
        if key not in self.directions:
            raise MonoscopeError(f"the vector has no direction at {key}; it has {', '.join(self.hooks)}")
        return key, self.directions[key]

    def scaled(self, coefficient: float) -> "SteeringVector":
        return SteeringVector(
            {h: v * coefficient for h, v in self.directions.items()},
            self.model,
            {**self.meta, "scaled_by": coefficient},
            self.name,
        )

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write `NAME.safetensors` (one tensor per hook point) and `NAME.json`; returns both paths."""
        tensors_path, json_path = _paths(path)
        atomic_save_safetensors(tensors_path, self.directions, metadata={"format": FORMAT})
        atomic_write_json(
            json_path,
            {
                "format": FORMAT,
                "model": self.model,
                "hooks": self.hooks,
                "norms": {h: round(float(v.norm()), 6) for h, v in self.directions.items()},
                **{k: v for k, v in self.meta.items() if k not in ("format", "model", "hooks", "norms")},
            },
        )
        return tensors_path, json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringVector":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        tensors_path, json_path = _paths(path)
        if not tensors_path.is_file():
            raise MonoscopeError(f"{tensors_path} does not exist; make a vector with `monoscope vector make`")
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as err:
            raise MonoscopeError(f"{tensors_path} could not be read ({err}); it is not a safetensors file") from err
        meta = read_json(json_path) if json_path.is_file() else {}
        if not isinstance(meta, dict):
            raise MonoscopeError(f"{json_path} is not a JSON object")
        model = meta.pop("model", None)
        for key in ("format", "hooks", "norms"):
            meta.pop(key, None)
        return cls(dict(tensors), model, meta, name=tensors_path.stem)


def _encode_all(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat_template: bool) -> list[torch.Tensor]:
    from .runtime import encode_prompt

    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise MonoscopeError("a contrastive prompt is empty; every prompt needs some text")
        out.append(encode_prompt(tokenizer, p, raw=not chat_template)[0])
    return out


@torch.inference_mode()
def mean_activations(
    lm: LoadedModel,
    prompts: Sequence[str],
    hooks: Sequence[str],
    *,
    position: str = "last",
    chat_template: bool = False,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Mean activation [d] at each hook over `prompts`: at each prompt's last token, or averaged over its tokens
    (the first left out)."""
    if position not in POSITION_MODES:
        raise MonoscopeError(f"unknown position {position!r}; use one of {', '.join(POSITION_MODES)}")
    encoded = _encode_all(lm.tokenizer, prompts, chat_template)
    sums: dict[str, torch.Tensor] = {}
    device = next(lm.model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, c in enumerate(chunk):  # right padding: real tokens keep positions 0..n-1
            ids[i, : len(c)] = c
            mask[i, : len(c)] = 1
        acts = run_to(lm.model, list(hooks), ids.to(device), mask.to(device))
        lengths = mask.sum(1)
        for h in hooks:
            x = acts[h].float().cpu()
            if position == "last":
                picked = x[torch.arange(len(chunk)), lengths - 1]
            else:
                weights = mask.clone().float()
                # the first position (BOS or, without one, the first token) is an attention sink whose norm is
                # many times the others': it would dominate the mean
                weights[:, 0] = torch.where(lengths > 1, 0.0, weights[:, 0])
                picked = (x * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
            total = picked.sum(0)
            sums[h] = sums[h] + total if h in sums else total
    return {h: s / len(encoded) for h, s in sums.items()}


def contrastive_vector(
    lm: LoadedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    hooks: "str | Sequence[str]",
    *,
    position: str = "last",
    chat_template: bool = False,
    batch_size: int = 8,
    name: str = "",
) -> SteeringVector:
    """mean(activations on `positive`) - mean(activations on `negative`) at each hook point.

    `position`: `last` (each prompt's last token, the usual choice for instructions) or `mean` (all tokens
    but BOS). `chat_template`: wrap each prompt as a user turn first.
    """
    positive, negative = [p for p in positive], [p for p in negative]
    if not positive or not negative:
        which = "positive" if not positive else "negative"
        raise MonoscopeError(
            f"the {which} prompt set is empty; a contrastive vector needs at least one prompt on each side"
        )
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise MonoscopeError("no hook point given; pass e.g. resid_post.12")
    hooks = [str(HookPoint.parse(h)) for h in hooks]
    n_layers = len(find_blocks(lm.model))
    for h in hooks:
        if HookPoint.parse(h).layer >= n_layers:
            raise MonoscopeError(f"hook point {h} does not exist: the model has {n_layers} layers (0-{n_layers - 1})")
    pos = mean_activations(lm, positive, hooks, position=position, chat_template=chat_template, batch_size=batch_size)
    neg = mean_activations(lm, negative, hooks, position=position, chat_template=chat_template, batch_size=batch_size)
    model_type = getattr(getattr(lm.model, "config", None), "model_type", None)
    meta = {
        "method": "contrastive-mean-difference",
        "position": position,
        "chat_template": chat_template,
        "n_positive": len(positive),
        "n_negative": len(negative),
        "model_type": model_type,
    }
    return SteeringVector({h: pos[h] - neg[h] for h in hooks}, getattr(lm, "name", None), meta, name)


# ---------------------------------------------------------------- llama.cpp control vectors


def gguf_layer(hook: str) -> int:
    """llama.cpp's `direction.N` index for a hook point: N = L for resid_post.L, L - 1 for resid_pre.L (N >= 1)."""
    hp = HookPoint.parse(hook)
    if hp.kind == "resid_post":
        n = hp.layer
    elif hp.kind == "resid_pre":
        n = hp.layer - 1
    else:
        raise MonoscopeError(
            f"llama.cpp adds control vectors to block outputs only; {hp} is not one: make the vector at resid_post.L"
        )
    if n < 1:
        raise MonoscopeError(
            f"llama.cpp cannot steer the output of block 0 ({hp}); make the vector at resid_post.1 or later"
        )
    return n


def export_gguf(
    vector: SteeringVector, path: str | os.PathLike, *, model_hint: str | None = None, coefficient: float = 1.0
) -> Path:
    """Write `vector` (times `coefficient`) as a llama.cpp control vector: `llama-cli --control-vector PATH`."""
    import gguf
    import numpy as np

    from .spec import check_number

    coefficient = check_number(coefficient, "coefficient")
    layers: dict[int, np.ndarray] = {}
    for hook, tensor in vector.directions.items():
        n = gguf_layer(hook)
        if n in layers:
            raise MonoscopeError(f"two hook points of the vector map to llama.cpp layer {n}; keep one of them")
        layers[n] = (tensor.float() * coefficient).numpy().astype(np.float32)
    hint = model_hint or vector.meta.get("model_type") or "llama"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", str(hint))
        writer.add_uint32("controlvector.layer_count", len(layers))
        for n in sorted(layers):
            writer.add_tensor(f"direction.{n}", layers[n])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """(metadata {key: value}, {llama.cpp layer N: direction}) of a control-vector GGUF."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as err:
        raise MonoscopeError(f"{path} is not a readable GGUF file ({err})") from err
    meta: dict[str, Any] = {}
    for key, fieldv in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = fieldv.contents()
        except Exception:  # pragma: no cover - older gguf versions
            meta[key] = fieldv.parts[-1].tolist()
    directions = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("direction."):
            directions[int(tensor.name.split(".", 1)[1])] = torch.tensor(tensor.data.copy()).float().flatten()
    return meta, directions


def vector_from_gguf(path: str | os.PathLike, model: str | None = None) -> SteeringVector:
    """A control-vector GGUF (llama.cpp / repeng) as a SteeringVector at resid_post.N."""
    meta, directions = read_gguf(path)
    if not directions:
        raise MonoscopeError(f"{path} has no direction.N tensors; it is not a control vector")
    return SteeringVector(
        {f"resid_post.{n}": v for n, v in directions.items()},
        model,
        {"model_type": meta.get("controlvector.model_hint")},
        Path(path).stem,
    )


def load_prompts(items: Iterable[str] | None, files: Iterable[str] | None) -> list[str]:
    """Prompts given inline plus those in text files (one per line; blank lines and `#` comments skipped)."""
    prompts = [p for p in (items or [])]
    for f in files or []:
        path = Path(f)
        if not path.is_file():
            raise MonoscopeError(f"prompt file {path} does not exist")
        prompts.extend(
            line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
        )
    return prompts
