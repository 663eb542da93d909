"""The `monoscope` command line: argument parsing and printing only; the work lives in the packages."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .argtypes import positive_float, positive_int
from .cli_common import (
    Parsers,
    add_config_flag,
    add_context_size_arg,
    add_corpus_args,
    add_hook_arg,
    add_json_flag,
    add_model_args,
    config_default,
    config_from_args,
    default_hooks,
)
from .errors import MonoscopeError

if TYPE_CHECKING:
    import torch

    from .data import ActivationCache, CacheBatches, HarvestConfig
    from .model import LoadedModel
    from .sae import TrainResult
    from .sae.evaluation import EvalRun

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


# ---------------------------------------------------------------- harvest


def cmd_harvest(args: argparse.Namespace) -> int:
    from .data import HarvestConfig
    from .model import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.model_dtype)
    cfg = config_from_args(HarvestConfig, args, hook_points=default_hooks(args.hook, loaded))
    _harvest(cfg, args.out, loaded, as_json=args.json)
    return 0


def _harvest(cfg: "HarvestConfig", out: str | Path, loaded: "LoadedModel", *, as_json: bool = False) -> None:
    """Harvest (or continue harvesting) into `out` and print what the cache holds."""
    from .data import harvest_to_cache
    from .data.cache import describe_size

    report = harvest_to_cache(cfg, out, loaded=loaded)
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
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    if report.already_complete:
        print(f"{report.folder} already holds {report.n_tokens:,} tokens of this harvest; nothing to do.")
    else:
        verb = "continued" if report.resumed else "harvested"
        print(f"{verb} {report.new_tokens:,} tokens at {report.tokens_per_second:,.0f} tok/s")
    print(
        f"  cache:   {report.folder}  ({report.n_tokens:,} tokens, {report.n_shards} shards, {summary['disk']}, "
        f"{cfg.cache_dtype})"
    )
    print(f"  model:   {cfg.model} (d_model {loaded.d_model}, {loaded.n_layers} layers)")
    for name, scale in (report.scale_factors or {}).items():
        print(f"  {name}: scale factor {scale:.4g} (so that E||x|| = sqrt({loaded.d_model}))")


def _add_harvest(sub: Parsers) -> None:
    from .data.harvest import CACHE_DTYPES, HarvestConfig

    p = sub.add_parser(
        "harvest",
        help="harvest activations at hook points into an on-disk cache",
        description="Run the model over a corpus and store activations at hook points (sharded safetensors). "
        "Re-running an interrupted harvest continues it.",
    )
    add_model_args(p, config_default(HarvestConfig, "model"))
    add_hook_arg(p, repeat=True, default_help="middle resid_post")
    add_corpus_args(
        p,
        config_default(HarvestConfig, "corpus"),
        text_column=config_default(HarvestConfig, "text_column"),
        split=config_default(HarvestConfig, "split"),
    )
    add_config_flag(p, HarvestConfig, "tokens", type=positive_int)
    p.add_argument("--out", required=True, help="cache folder to create (or continue)")
    add_config_flag(p, HarvestConfig, "context_size", type=positive_int)
    add_config_flag(p, HarvestConfig, "batch_size", type=positive_int)
    add_config_flag(p, HarvestConfig, "seed", type=int)
    add_config_flag(p, HarvestConfig, "cache_dtype", choices=list(CACHE_DTYPES))
    add_config_flag(p, HarvestConfig, "shard_tokens", type=positive_int)
    add_json_flag(p)
    p.set_defaults(func=cmd_harvest)


# ---------------------------------------------------------------- train


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) if "e" in v.lower() else int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or a comma-separated list, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _sae_info(
    *, model: str | None, context_size: int | None, corpus: object, harvest_contexts: int | None, source: str
) -> dict[str, Any]:
    """monoscope.json facts shared by every SAE of a run (the trainer adds each SAE's own hook point)."""
    return {
        "model": model,
        "model_name": model,
        "context_size": context_size,
        "corpus": corpus,
        "harvest_contexts": harvest_contexts,
        "activations": source,
    }


def _cache_source(
    folder: str | Path, hook: str | None, batch_size: int, seed: int
) -> tuple["ActivationCache", str, "CacheBatches", dict[str, Any]]:
    """(cache, hook point, shuffled batches, monoscope.json facts) for training on a harvest cache."""
    from .data import ActivationCache

    cache = ActivationCache(folder)
    hook = cache.hook(hook)
    harvest = cache.manifest["harvest"]
    corpus = {
        "spec": harvest.get("corpus"),
        **{key: harvest.get(key) for key in ("seed", "text_column", "split", "dataset_config")},
    }
    info = _sae_info(
        model=cache.model_name,
        context_size=harvest.get("context_size"),
        corpus=corpus,
        harvest_contexts=cache.manifest.get("contexts_done"),
        source=str(cache.path),
    )
    return cache, hook, cache.batches(batch_size, hook, seed=seed), info


def _say_training_on(cache: "ActivationCache", hook: str, tokens: int) -> str:
    return (
        f"training on {cache.path} ({cache.n_tokens:,} tokens at {hook}, d_model {cache.d_model}; "
        f"{tokens / cache.n_tokens:.1f} epochs)"
    )


def _say_trained(results: Mapping[str, "TrainResult"]) -> Iterator[str]:
    """What `train` prints of the SAEs it saved, and the next command."""
    for result in results.values():
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.final_metrics.items() if isinstance(v, (int, float)))
        status = "" if result.complete else " (stopped early: the activation stream ended)"
        yield f"saved {result.folder}: {result.tokens:,} tokens, {result.steps} steps{status}; {metrics}"
    if results:
        yield f"next: monoscope eval --sae {next(iter(results.values())).folder}"


def cmd_train(args: argparse.Namespace) -> int:
    from .sae import TrainConfig, train_saes
    from .sae import registry as sae_architectures
    from .sae.distributed import describe_memory, setup, shard_corpus, train_distributed
    from .sae.optim import optimizer_config

    dist = setup()  # rank 0 of 1 unless started by torchrun
    say = print if dist.is_main else (lambda *a, **k: None)

    streaming = args.model is not None or args.corpus is not None
    if bool(args.activations) == streaming:
        raise MonoscopeError(
            "train needs either --activations (a harvest cache folder or a .safetensors file) or --model/--hook/--corpus to stream from the model, not both"
        )
    architecture = sae_architectures.get(args.arch)
    own_flags = {flag.flag for flag in architecture.cli_flags}
    for other in sae_architectures.architectures():
        for flag in other.cli_flags:
            if flag.flag not in own_flags and getattr(args, flag.dest) is not None:
                raise MonoscopeError(f"{flag.flag} is for --arch {other.name}; {args.arch} sets its sparsity with --k")
    sweep = [(d, k) for d in args.d_sae for k in args.k]
    if args.activations:
        cache, hook, batches, info = _cache_source(
            args.activations, args.hook[0] if args.hook else None, args.batch_size, args.seed
        )
        hooks, scales, d_in = [hook], {hook: cache.scale_factor(hook)}, cache.d_model
        stream = _KeyedBatches(batches, hook) if len(sweep) > 1 else batches
        say(_say_training_on(cache, hook, args.tokens))
    else:
        from .data import ActivationStream, Harvester, open_corpus
        from .model import EMBEDDED_MODEL, load_model

        model_name = args.model or EMBEDDED_MODEL
        loaded = load_model(model_name, device=dist.device if dist.world > 1 else args.device, dtype=args.model_dtype)
        hooks = default_hooks(args.hook, loaded)
        corpus_obj = open_corpus(
            args.corpus or "starter",
            seed=args.seed,
            text_column=args.text_column,
            split=args.split,
            dataset_config=args.dataset_config,
        )
        if args.distribute == "data":
            corpus_obj = shard_corpus(corpus_obj)  # rank r reads every N-th document
        harvester = Harvester(loaded, corpus_obj, hooks, args.context_size, 16)
        stream = ActivationStream(harvester, args.batch_size, seed=args.seed, max_tokens=args.tokens)
        scales, d_in = stream.scale_factors, loaded.d_model
        # The stream reads at most the training tokens plus its shuffle buffer: held-out text starts after that.
        read_at_most = -(-(args.tokens + stream.shuffle_tokens) // (args.context_size - 1)) + 16
        info = _sae_info(
            model=model_name,
            context_size=args.context_size,
            corpus=corpus_obj.describe(),
            harvest_contexts=read_at_most,
            source="stream",
        )
        say(f"training straight from {model_name} at {', '.join(hooks)} on corpus {corpus_obj.spec}")
    configs = {}
    for hook in hooks:
        for d_sae, k in sweep:
            cfg = TrainConfig(
                d_in=d_in,
                total_tokens=args.tokens,
                d_sae=d_sae,
                arch=architecture.config_from_cli(k, args),
                batch_size=args.batch_size,
                optimizer=optimizer_config(args.optimizer, args.lr),
                seed=args.seed,
                hook_name=hook,
                activation_scale=scales[hook],
            )
            name = "." if len(hooks) * len(sweep) == 1 else f"{hook}-{args.arch}-{d_sae}-k{k}"
            configs[name] = cfg
    memory = describe_memory(configs.values(), dist.world if args.distribute == "data" else 1)
    if memory:
        say(memory)
    if dist.world > 1:
        results = train_distributed(
            configs,
            stream,
            args.out,
            info=info,
            single=list(configs) == ["."],
            mode=args.distribute,
            split="rows" if args.activations else "own",
        )
    elif list(configs) == ["."]:
        from .sae import train_sae

        results = {".": train_sae(configs["."], stream, args.out, info=info)}
    else:
        results = train_saes(configs, stream, args.out, info=info)
    for line in _say_trained(results):
        say(line)
    return 0


class _KeyedBatches:
    """A single-hook batch source as the {hook: tensor} stream a sweep trains from; keeps iter_from."""

    def __init__(self, batches: "CacheBatches", hook: str):
        self.batches, self.hook = batches, hook

    def __iter__(self) -> Iterator[dict[str, "torch.Tensor"]]:
        return self.iter_from(0)

    def iter_from(self, index: int) -> Iterator[dict[str, "torch.Tensor"]]:
        return ({self.hook: b} for b in self.batches.iter_from(index))


def _add_train(sub: Parsers) -> None:
    from .data import HarvestConfig

    p = sub.add_parser(
        "train",
        help="train sparse autoencoders on activations",
        description="Train SAEs from a harvest cache (many epochs, cheap resume) or straight from the model. "
        "Comma-separated --d-sae/--k values train a sweep from one pass. "
        "Re-running an interrupted command resumes from its last checkpoint.",
    )
    p.add_argument(
        "--activations", help="harvest cache folder, or a .safetensors file with an 'activations' tensor [N, d_in]"
    )
    p.add_argument("--d-sae", type=_int_list, required=True, help="latents (comma-separated for a sweep)")
    from .sae import registry as sae_architectures  # the architectures' names, --k meanings and own flags

    architectures = sae_architectures.architectures()
    k_meanings = ", ".join(a.k_meaning for a in architectures)
    p.add_argument(
        "--k",
        type=_int_list,
        default=[32],
        help=f"active latents per token: {k_meanings} (comma-separated for a sweep; default 32)",
    )
    p.add_argument(
        "--tokens", type=positive_int, required=True, help="training tokens (epochs over a cache are taken as needed)"
    )
    p.add_argument("--out", required=True, help="output folder (SAELens format: cfg.json + sae_weights.safetensors)")
    p.add_argument(
        "--arch",
        default="topk",
        choices=sae_architectures.names(),
        help="architecture (default: topk; docs/sae.md compares them)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per step (default: 4096)")
    p.add_argument(
        "--optimizer",
        default=None,
        choices=["adam", "signum", "adam_sf"],
        help="optimiser: adam (default), signum (schedule-free sign-SGD, sparsify's default) or adam_sf (schedule-free Adam); see docs/sae.md",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="learning rate (default: the optimiser's rule, base / sqrt(d_sae / 16384); "
        "adam: 8e-4 at 16384 latents for topk/batchtopk, 2e-4 for jumprelu/relu)",
    )
    p.add_argument("--seed", type=int, default=0)
    for flag in {flag.flag: flag for a in architectures for flag in a.cli_flags}.values():  # once if shared
        p.add_argument(flag.flag, type=flag.type, default=None, help=flag.help)
    add_hook_arg(p, repeat=True, default_help="a cache's only one; when streaming, the middle resid_post")
    add_model_args(p, None, "smollm2-135m-instruct when streaming")
    add_corpus_args(p, None, default_help="starter when streaming")
    add_context_size_arg(p, config_default(HarvestConfig, "context_size"), when="when streaming: ")
    p.add_argument(
        "--distribute",
        choices=["data", "spread"],
        default="data",
        help="under torchrun: data = every rank trains every SAE on its share of each batch (default); spread = the SAEs of a sweep are dealt to the ranks",
    )
    p.set_defaults(func=cmd_train)


# ---------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from .sae.evaluation import EvalConfig, evaluate_folder

    run = evaluate_folder(
        args.sae,
        config_from_args(EvalConfig, args),
        model=args.model,
        hook=args.hook,
        corpus=args.corpus,
        seed=args.seed,
        text_column=args.text_column,
        split=args.split,
        dataset_config=args.dataset_config,
        device=args.device,
        dtype=args.model_dtype,
    )
    _print_eval(run, args.sae, as_json=args.json)
    return 0


#: The rows `monoscope eval` prints: (label, key of eval.json).
EVAL_ROWS = (
    ("L0", "l0"),
    ("explained variance", "explained_variance"),
    ("FVU", "fvu"),
    ("MSE", "mse"),
    ("cosine(x, x_hat)", "cosine_similarity"),
    ("shrinkage", "shrinkage"),
    ("alive latents", "frac_alive"),
    ("denser than 1%", "frac_dense_1pct"),
    ("denser than 10%", "frac_dense_10pct"),
    ("CE clean", "ce_clean"),
    ("CE with SAE", "ce_sae"),
    ("CE zero-ablated", "ce_zero_ablation"),
    ("CE mean-ablated", "ce_mean_ablation"),
    ("ce_loss_score", "ce_loss_score"),
    ("delta loss (CE_sae - CE_clean)", "delta_loss"),
    ("ce_loss_score (mean abl.)", "ce_loss_score_mean_ablation"),
    ("KL div score", "kl_div_score"),
)


def _print_eval(run: "EvalRun", sae_dir: str | Path, *, as_json: bool = False) -> None:
    result, skip = run.result, run.skip_contexts
    if as_json:
        print(json.dumps(result, indent=2))
        return
    region = f"contexts {skip:,}-{skip + result['held_out_region_contexts']:,}"
    print(
        f"{sae_dir}: {run.hook} of {run.model}, {result['tokens']:,} held-out tokens in {result['contexts']} contexts sampled from "
        f"{region}" + (" (after the training contexts)" if skip else "") + "; [95% bootstrap interval over contexts]"
    )
    intervals = result.get("intervals", {})
    for label, key in EVAL_ROWS:
        low_high = intervals.get(key)
        spread = f"  [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""
        print(f"  {label:<31}{result[key]:.4f}{spread}")
    print(f"written to {run.path}")


def _add_eval(sub: Parsers) -> None:
    from .sae.evaluation import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate an SAE: reconstruction and LM loss with the SAE spliced in",
        description="SAEBench-style metrics on held-out text; writes eval.json next to the SAE.",
    )
    p.add_argument("--sae", required=True, help="SAE folder")
    add_model_args(p, None, "the SAE's model")
    add_corpus_args(p, None, default_help="the SAE's training corpus")
    add_config_flag(p, EvalConfig, "tokens", type=positive_int)
    add_hook_arg(p, default_help="the SAE's own")
    add_config_flag(p, EvalConfig, "context_size", type=positive_int)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="corpus seed (default: the training corpus seed, so held-out text follows the training text)",
    )
    add_config_flag(p, EvalConfig, "sample_seed", type=int)
    add_config_flag(p, EvalConfig, "untouched_positions", type=positive_int)
    add_json_flag(p, "the metrics as JSON")
    p.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------- quickstart


#: The quickstart's hook point: a third of the way up SmolLM2-135M's 30 layers. Concept features were as
#: findable there as at layers 12 and 15 and a little closer to their concepts (docs/steering.md, "Concepts"),
#: and the harvest stops there, so the same time buys twice the tokens of layer 15.
QUICKSTART_HOOK = "resid_post.9"


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Harvest -> train -> evaluate on the embedded default, each step resumable, then say what to run next."""
    from .data import HarvestConfig
    from .features.analyze import AnalysisConfig, analyze_sae
    from .features.cli import print_analysis
    from .model import EMBEDDED_MODEL, load_model
    from .sae.evaluation import EvalConfig, evaluate_folder

    out = Path(args.out)
    acts, sae_dir = out / "activations", out / "sae"
    print(f"monoscope quickstart: {EMBEDDED_MODEL} + starter corpus -> {out}")
    loaded = load_model(EMBEDDED_MODEL)
    print(f"\n[1/4] harvest {args.tokens:,} tokens of {args.hook} activations")
    _harvest(HarvestConfig(model=EMBEDDED_MODEL, hook_points=[args.hook], tokens=args.tokens), acts, loaded)
    print(f"\n[2/4] train a TopK SAE (d_sae {args.d_sae}, k {args.k}) on {args.train_tokens:,} tokens")
    if (sae_dir / "sae_weights.safetensors").is_file():
        print(f"{sae_dir} already holds a trained SAE; delete it to train again")
    else:
        _quickstart_train(acts, sae_dir, d_sae=args.d_sae, k=args.k, tokens=args.train_tokens)
    print(
        f"\n[3/4] evaluate on {args.eval_tokens:,} held-out tokens (the first token after BOS, whose outsized activations "
        "would decide FVU, is left out: --untouched-positions 2)"
    )
    _print_eval(
        evaluate_folder(sae_dir, EvalConfig(tokens=args.eval_tokens, untouched_positions=2), loaded=loaded), sae_dir
    )
    print(f"\n[4/4] build the feature database from {args.analyze_tokens:,} tokens")
    db = sae_dir / "features.db"
    if db.is_file():
        print(f"{db} already exists; `monoscope analyze --sae {sae_dir}` rebuilds it")
    else:
        report = analyze_sae(sae_dir, config=AnalysisConfig(tokens=args.analyze_tokens), loaded=loaded)
        print_analysis(report, sae_dir, args.analyze_tokens)
    _print_sample_features(db)
    print("\nnext:")
    print(
        f"  monoscope serve --sae {sae_dir}                     # browse, scan and steer in the web UI at http://127.0.0.1:8000"
    )
    print(f'  monoscope features search --sae {sae_dir} "python code"')
    print(f'  monoscope steer --sae {sae_dir} --toward "the ocean" --prompt "Tell me a story" --max-new-tokens 40')
    print(f'  monoscope steer --sae {sae_dir} --feature ID=clamp:8x --prompt "Tell me a story" --max-new-tokens 40')
    print(f"  monoscope chat --sae {sae_dir}                      # /set ID 8x between turns")
    return 0


def _quickstart_train(acts: Path, sae_dir: Path, *, d_sae: int, k: int, tokens: int) -> None:
    """What `monoscope train --activations ACTS --d-sae D --k K --tokens T --out SAE_DIR` does (one TopK SAE, default
    batch size, optimiser and seed), resuming from its last checkpoint."""
    from .sae import TrainConfig, train_sae
    from .sae.distributed import describe_memory
    from .sae.optim import optimizer_config

    batch_size, seed = config_default(TrainConfig, "batch_size"), config_default(TrainConfig, "seed")
    cache, hook, batches, info = _cache_source(acts, None, batch_size, seed)
    print(_say_training_on(cache, hook, tokens))
    cfg = TrainConfig(
        d_in=cache.d_model,
        total_tokens=tokens,
        d_sae=d_sae,
        architecture="topk",
        k=k,
        batch_size=batch_size,
        optimizer=optimizer_config(),
        seed=seed,
        hook_name=hook,
        activation_scale=cache.scale_factor(hook),
    )
    memory = describe_memory([cfg])
    if memory:
        print(memory)
    for line in _say_trained({".": train_sae(cfg, batches, sae_dir, info=info)}):
        print(line)


def _print_sample_features(db: Path, n: int = 8) -> None:
    """A handful of features whose labels hold best on held-out examples (embedding score), as a first taste."""
    from .features import FeatureStore

    store = FeatureStore(db)
    records = [r for r in store.features() if 1e-3 <= r.density <= 0.05 and r.label]
    held = store.label_scores([r.id for r in records])
    scored = [(held[r.id], r) for r in records if r.id in held]
    # Many labels tie at the top score: among ties, word labels (a concept) before token lists ('a', 'b' → ...),
    # in a seeded shuffle rather than by id, so the taste is not the first few ids of the dictionary.
    random.Random(0).shuffle(scored)
    scored.sort(key=lambda pair: (-round(pair[0], 2), "→" in (pair[1].label or "")))
    print(
        f"\nsome features (of {store.n_features:,}) whose label tells held-out examples from random text best, "
        "word labels first (embedding score: 0.5 chance, 1 perfect):"
    )
    for score, record in scored[:n]:
        print(f"  #{record.id:<6} density {record.density:6.2%}  score {score:.2f}  {record.label}")
    if held:
        values = sorted(held.values())
        print(
            f"  all {len(values):,} scored labels: median {values[len(values) // 2]:.2f}, "
            f"{sum(v >= 0.8 for v in values) / len(values):.0%} at 0.8 or more"
        )


def _add_quickstart(sub: Parsers) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on the embedded model and starter corpus",
        description="Harvest activations from the embedded SmolLM2-135M-Instruct on the offline starter corpus, "
        "train a TopK SAE, evaluate it and build its feature database. Every step resumes if interrupted.",
    )
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    p.add_argument(
        "--hook",
        default=QUICKSTART_HOOK,
        help=f"hook point (default: {QUICKSTART_HOOK}, chosen by benchmarks/bench_concepts.py)",
    )
    p.add_argument("--tokens", type=positive_int, default=400_000, help="tokens to harvest (default: 400000)")
    p.add_argument(
        "--train-tokens",
        type=positive_int,
        default=2_000_000,
        help="training tokens, epochs over the harvest (default: 2000000)",
    )
    p.add_argument("--d-sae", type=positive_int, default=4608, help="latents (default: 4608 = 8 x 576)")
    p.add_argument("--k", type=positive_int, default=32, help="active latents per token (default: 32)")
    p.add_argument("--eval-tokens", type=positive_int, default=8192, help="held-out evaluation tokens (default: 8192)")
    p.add_argument(
        "--analyze-tokens", type=positive_int, default=100_000, help="tokens for the feature database (default: 100000)"
    )
    p.set_defaults(func=cmd_quickstart)


# ---------------------------------------------------------------- entry point

from .autointerp.cli import register_explain  # noqa: E402
from .features.cli import register as register_features  # noqa: E402
from .features.export.cli import register as register_export  # noqa: E402
from .sae.cli_interop import register as register_import_sae  # noqa: E402
from .server.cli import register as register_server  # noqa: E402
from .steer.cli import register as register_steer  # noqa: E402

_COMMANDS: list[Callable[[Parsers], object]] = [
    _add_quickstart,
    _add_harvest,
    _add_train,
    _add_eval,
    register_features,
    register_explain,
    register_steer,
    register_server,
    register_import_sae,
    register_export,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="monoscope", description="Learn, browse and steer sparse-autoencoder features of Hugging Face causal LMs."
    )
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
        print(
            "\nmonoscope: interrupted; harvest shards and training checkpoints already written are kept, and the same command continues from them",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
