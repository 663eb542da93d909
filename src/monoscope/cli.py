"""The `monoscope` command line: argument parsing and printing only; the work lives in the packages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import MonoscopeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging setup must never stop a command
        pass


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = "smollm2-135m-instruct") -> None:
    p.add_argument("--model", default=default_model, help="hub id, local folder, or smollm2-135m-instruct (embedded, offline)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--model-dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, float16, bfloat16")


def _add_corpus_args(p: argparse.ArgumentParser, default: str | None = "starter") -> None:
    p.add_argument("--corpus", default=default, help="starter (offline), a .txt/.jsonl/.parquet file or folder, or hf:DATASET_ID")
    p.add_argument("--text-column", default="text", help="column holding the text in JSONL/Parquet/HF data (default: text)")
    p.add_argument("--split", default="train", help="HF dataset split (default: train)")
    p.add_argument("--dataset-config", default=None, help="HF dataset configuration name")


def _middle_resid(loaded) -> str:
    return f"resid_post.{loaded.n_layers // 2}"


# ---------------------------------------------------------------- harvest


def cmd_harvest(args: argparse.Namespace) -> int:
    from .data import HarvestConfig, harvest_to_cache
    from .data.cache import describe_size
    from .model import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.model_dtype)
    cfg = HarvestConfig(
        model=args.model,
        hook_points=args.hook or [_middle_resid(loaded)],
        corpus=args.corpus,
        text_column=args.text_column,
        split=args.split,
        dataset_config=args.dataset_config,
        tokens=args.tokens,
        context_size=args.context_size,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        model_dtype=args.model_dtype,
        cache_dtype=args.cache_dtype,
        shard_tokens=args.shard_tokens,
    )
    report = harvest_to_cache(cfg, args.out, loaded=loaded)
    size = sum(p.stat().st_size for p in Path(report.folder).glob("shard-*.safetensors"))
    summary = {
        "out": str(report.folder),
        "model": cfg.model,
        "hook_points": cfg.hook_points,
        "d_model": loaded.d_model,
        "tokens": report.n_tokens,
        "new_tokens": report.new_tokens,
        "shards": report.n_shards,
        "disk": describe_size(size),
        "scale_factors": report.scale_factors,
        "tokens_per_second": round(report.tokens_per_second, 1) if report.new_tokens else None,
        "resumed": report.resumed,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if report.already_complete:
        print(f"{report.folder} already holds {report.n_tokens:,} tokens of this harvest; nothing to do.")
    verb = "continued" if report.resumed else "harvested"
    print(f"{verb} {report.new_tokens:,} tokens" + (f" at {report.tokens_per_second:,.0f} tok/s" if report.new_tokens else ""))
    print(f"  cache:   {report.folder}  ({report.n_tokens:,} tokens, {report.n_shards} shards, {summary['disk']}, {cfg.cache_dtype})")
    print(f"  model:   {cfg.model} (d_model {loaded.d_model}, {loaded.n_layers} layers)")
    for name, scale in (report.scale_factors or {}).items():
        print(f"  {name}: scale factor {scale:.4g} (so that E||x|| = sqrt({loaded.d_model}))")
    return 0


def _add_harvest(sub) -> None:
    p = sub.add_parser("harvest", help="harvest activations at hook points into an on-disk cache", description="Run the model over a corpus and store activations at hook points (sharded safetensors). Re-running an interrupted harvest continues it.")
    _add_model_args(p)
    p.add_argument("--hook", action="append", help="hook point KIND.LAYER (resid_pre, resid_post, attn_out, mlp_out); repeat for several (default: middle resid_post)")
    _add_corpus_args(p)
    p.add_argument("--tokens", type=_positive_int, default=200_000, help="tokens to harvest (default: 200000)")
    p.add_argument("--out", required=True, help="cache folder to create (or continue)")
    p.add_argument("--context-size", type=_positive_int, default=128, help="tokens per packed context, BOS included (default: 128)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="contexts per forward pass (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="corpus shuffling seed (default: 0)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="storage dtype (default: float16)")
    p.add_argument("--shard-tokens", type=_positive_int, default=32_768, help="rows per shard file (default: 32768)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_harvest)


# ---------------------------------------------------------------- quickstart


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .data import HarvestConfig, harvest_to_cache
    from .model import EMBEDDED_MODEL, load_model

    out = Path(args.out)
    print(f"monoscope quickstart: {EMBEDDED_MODEL}, starter corpus, {args.tokens:,} tokens -> {out}")
    loaded = load_model(EMBEDDED_MODEL)
    cfg = HarvestConfig(model=EMBEDDED_MODEL, hook_points=[_middle_resid(loaded)], corpus="starter", tokens=args.tokens)
    report = harvest_to_cache(cfg, out / "activations", loaded=loaded)
    print(f"harvested {report.n_tokens:,} tokens at {cfg.hook_points[0]} into {report.folder}")
    print(f"  scale factor {report.scale_factors[cfg.hook_points[0]]:.4g}; throughput {report.tokens_per_second:,.0f} tok/s" if report.new_tokens else "  (already complete)")
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the embedded model and starter corpus", description="Harvest activations from the embedded SmolLM2-135M-Instruct on the offline starter corpus.")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    p.add_argument("--tokens", type=_positive_int, default=200_000, help="tokens to harvest (default: 200000)")
    p.set_defaults(func=cmd_quickstart)


# ---------------------------------------------------------------- entry point

_COMMANDS: list[Callable] = [_add_quickstart, _add_harvest]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="monoscope", description="Learn, browse and steer sparse-autoencoder features of Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"monoscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        return int(args.func(args) or 0)
    except MonoscopeError as err:
        print(f"monoscope: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nmonoscope: interrupted; everything finished so far is saved: run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
