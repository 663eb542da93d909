"""Command-line arguments every stage shares, declared once: model, device, corpus, hook, context size, and
flags read from a dataclass config.

Each command keeps its own defaults (a command that reopens what an SAE recorded defaults to None, meaning
"the SAE's"); the flag names, sources and help sentences live here only. Parsing only: no heavy imports.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, TypeVar

from .config import JsonConfig

if TYPE_CHECKING:
    from .model import LoadedModel

MODEL_SOURCES = (
    "hub id, local folder, .gguf file (dequantised once into the cache), or smollm2-135m-instruct (embedded, offline)"
)
CORPUS_SOURCES = "starter (offline), a .txt/.jsonl/.parquet file or folder, or hf:DATASET_ID"
HOOK_POINT = "hook point KIND.LAYER (resid_pre, resid_post, attn_out, mlp_out)"


class Parsers(Protocol):
    """What `ArgumentParser.add_subparsers()` returns, as the commands' `register(subparsers)` use it."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def _with_default(text: str, default: object, default_help: str | None) -> str:
    """`text (default: X)`: X is `default_help` when given, else the default itself; nothing for a bare None."""
    if default_help is not None:
        return f"{text} (default: {default_help})"
    return text if default is None else f"{text} (default: {default})"


def add_model_arg(p: argparse.ArgumentParser, default: str | None, default_help: str | None = None) -> None:
    """--model: which model to load."""
    p.add_argument("--model", default=default, help=_with_default(MODEL_SOURCES, default, default_help))


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --model-dtype: where the model runs and in what precision."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--model-dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, float16, bfloat16")


def add_model_args(p: argparse.ArgumentParser, default: str | None, default_help: str | None = None) -> None:
    """--model, --device, --model-dtype, in that order."""
    add_model_arg(p, default, default_help)
    add_device_args(p)


def add_hook_arg(p: argparse.ArgumentParser, *, repeat: bool = False, default_help: str | None = None) -> None:
    """--hook: one hook point, or (repeat) several, one per flag."""
    text = HOOK_POINT + ("; repeat for several" if repeat else "")
    p.add_argument(
        "--hook", default=None, action="append" if repeat else "store", help=_with_default(text, None, default_help)
    )


def default_hooks(hooks: Sequence[str] | None, loaded: "LoadedModel") -> list[str]:
    """The --hook points given, else the middle layer's resid_post."""
    return list(hooks) if hooks else [f"resid_post.{loaded.n_layers // 2}"]


def add_corpus_args(
    p: argparse.ArgumentParser,
    default: str | None,
    *,
    default_help: str | None = None,
    text_column: str | None = "text",
    split: str | None = "train",
    recorded: str | None = None,
) -> None:
    """--corpus, --text-column, --split, --dataset-config. A None default for the column or split means the
    one `recorded` says (e.g. "the SAE's"), else open_corpus's own (text, train)."""
    p.add_argument("--corpus", default=default, help=_with_default(CORPUS_SOURCES, default, default_help))
    column_help = "column holding the text in JSONL/Parquet/HF data"
    p.add_argument(
        "--text-column",
        default=text_column,
        help=_with_default(column_help, text_column, recorded and f"{recorded}, else text"),
    )
    p.add_argument(
        "--split", default=split, help=_with_default("HF dataset split", split, recorded and f"{recorded}, else train")
    )
    p.add_argument(
        "--dataset-config",
        default=None,
        help="HF dataset configuration name" + (f" (default: {recorded})" if recorded else ""),
    )


def add_context_size_arg(
    p: argparse.ArgumentParser, default: int | None, default_help: str | None = None, *, when: str = ""
) -> None:
    """--context-size: tokens per packed context, BOS included."""
    from .argtypes import positive_int

    p.add_argument(
        "--context-size",
        type=positive_int,
        default=default,
        help=_with_default(f"{when}tokens per context, BOS included", default, default_help),
    )


# ---------------------------------------------------------------- flags read from a dataclass config

C = TypeVar("C", bound=JsonConfig)


def _field(config: type[JsonConfig], name: str) -> "dataclasses.Field[object]":
    return next(f for f in dataclasses.fields(config) if f.name == name)


def config_default(config: type[JsonConfig], name: str) -> Any:
    """The default of a config field (calling its default_factory when it has one)."""
    f = _field(config, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{config.__name__}.{name} has no default")


def add_config_flag(
    p: argparse.ArgumentParser,
    config: type[JsonConfig],
    name: str,
    *,
    type: Callable[[str], object] = str,
    choices: Sequence[str] | None = None,
) -> None:
    """--NAME (underscores as dashes) for a config field: its default, and its help from the field's metadata
    ("help", and "default_help" to say what a None default means)."""
    default = config_default(config, name)
    metadata = _field(config, name).metadata
    if "help" not in metadata:
        raise KeyError(f"{config.__name__}.{name} has no help in its metadata")
    p.add_argument(
        "--" + name.replace("_", "-"),
        dest=name,
        type=type,
        choices=choices,
        default=default,
        help=_with_default(metadata["help"], default, metadata.get("default_help")),
    )


def config_from_args(config: type[C], args: argparse.Namespace, **values: object) -> C:
    """The config built from the parsed flags named like its fields, `values` overriding them."""
    parsed: Mapping[str, object] = vars(args)
    chosen = {f.name: parsed[f.name] for f in dataclasses.fields(config) if f.name in parsed}
    return config.from_dict({**chosen, **values})


def add_json_flag(p: argparse.ArgumentParser, what: str = "a JSON summary") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what}")
