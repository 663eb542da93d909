"""Load any `transformers` causal LM (hub id, folder, GGUF file), or the embedded default, with one call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import MonoscopeError
from .gguf_files import (
    EMBEDDED_MODEL,
    embedded_gguf_path,
    ensure_embedded_checkpoint,
    ensure_gguf_checkpoint,
    is_gguf_file,
)

if TYPE_CHECKING:  # transformers takes seconds to import: only the type checker reads it here
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODEL",
    "LoadedModel",
    "embedded_gguf_path",
    "ensure_embedded_checkpoint",
    "ensure_gguf_checkpoint",
    "load_model",
    "model_source",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was asked for (recorded in every artefact)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def config(self) -> PretrainedConfig:
        """The text model's config (a multimodal model's `config` wraps it)."""
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def d_model(self) -> int:
        cfg = self.config
        for attr in ("hidden_size", "n_embd", "d_model"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        raise MonoscopeError(
            f"cannot tell the hidden size of {self.name}: its config has no hidden_size/n_embd/d_model"
        )

    @property
    def n_layers(self) -> int:
        cfg = self.config
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        raise MonoscopeError(f"cannot tell the layer count of {self.name}: its config has no num_hidden_layers/n_layer")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise MonoscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MonoscopeError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError as err:
        raise MonoscopeError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(_DTYPES)))}") from err


def model_source(name: str) -> str | Path:
    """What `from_pretrained` reads for `name`: a folder (given, or the cache of a GGUF file) or a hub id."""
    if name == EMBEDDED_MODEL:
        return ensure_embedded_checkpoint()
    path = Path(name).expanduser()
    accepted = f"pass a transformers model folder, a .gguf file, a hub id (org/name) or {EMBEDDED_MODEL}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MonoscopeError(f"{name} is a folder without config.json; {accepted}")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf" or is_gguf_file(path):
            return ensure_gguf_checkpoint(path)
        raise MonoscopeError(f"{name} is a file but not a GGUF model (.gguf); {accepted}")
    if path.exists():
        raise MonoscopeError(f"{name} is neither a folder nor a file; {accepted}")
    if path.suffix.lower() == ".gguf":
        raise MonoscopeError(f"GGUF file {name} does not exist; check the path")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MonoscopeError(f"model folder {name} does not exist; {accepted}")
    return name


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load a causal LM by hub id, local folder, GGUF file (dequantised once into the cache), or
    `smollm2-135m-instruct` (offline default), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MonoscopeError(
            f"could not load model {name!r}: {first_line[:300]}. Pass a hub id (needs network or a filled HF cache), "
            f"a local folder with config.json, a .gguf file, or {EMBEDDED_MODEL}"
        ) from err
    # transformers declares .to with functools.wraps(nn.Module.to), which pyright reads as the unbound method
    model.to(dev)  # pyright: ignore[reportArgumentType]
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
