"""The `monoscope` command line: argument parsing and printing only; the work lives in the packages."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

from .argtypes import non_negative_float, positive_float, positive_int
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


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = "smollm2-135m-instruct") -> None:
    p.add_argument("--model", default=default_model, help="hub id, local folder, .gguf file (dequantised once into the cache), or smollm2-135m-instruct (embedded, offline)")
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


def cmd_harvest(args: argparse.Namespace, loaded=None) -> int:
    from .data import HarvestConfig, harvest_to_cache
    from .data.cache import describe_size
    from .model import load_model

    loaded = loaded or load_model(args.model, device=args.device, dtype=args.model_dtype)
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
    else:
        verb = "continued" if report.resumed else "harvested"
        print(f"{verb} {report.new_tokens:,} tokens at {report.tokens_per_second:,.0f} tok/s")
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
    p.add_argument("--tokens", type=positive_int, default=200_000, help="tokens to harvest (default: 200000)")
    p.add_argument("--out", required=True, help="cache folder to create (or continue)")
    p.add_argument("--context-size", type=positive_int, default=128, help="tokens per packed context, BOS included (default: 128)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="contexts per forward pass (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="corpus shuffling seed (default: 0)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="storage dtype (default: float16)")
    p.add_argument("--shard-tokens", type=positive_int, default=32_768, help="rows per shard file (default: 32768)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
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


def _sae_info(*, model, context_size, corpus, harvest_contexts, source) -> dict:
    """monoscope.json facts shared by every SAE of a run (the trainer adds each SAE's own hook point)."""
    return {"model": model, "model_name": model, "context_size": context_size, "corpus": corpus,
            "harvest_contexts": harvest_contexts, "activations": source}


def cmd_train(args: argparse.Namespace) -> int:
    from .sae import TrainConfig, train_saes
    from .sae.distributed import describe_memory, setup, shard_corpus, train_distributed
    from .sae.optim import optimizer_config

    dist = setup()  # rank 0 of 1 unless started by torchrun
    say = print if dist.is_main else (lambda *a, **k: None)

    streaming = args.model is not None or args.corpus is not None
    if bool(args.activations) == streaming:
        raise MonoscopeError("train needs either --activations (a harvest cache folder or a .safetensors file) or --model/--hook/--corpus to stream from the model, not both")
    if args.l1_coefficient is not None and args.arch != "relu":
        raise MonoscopeError(f"--l1-coefficient is for --arch relu; {args.arch} sets its sparsity with --k")
    sweep = [(d, k) for d in args.d_sae for k in args.k]
    if args.activations:
        from .data import ActivationCache

        cache = ActivationCache(args.activations)
        hook = cache.hook(args.hook[0] if args.hook else None)
        batches = cache.batches(args.batch_size, hook, seed=args.seed)
        harvest = cache.manifest["harvest"]
        corpus = {"spec": harvest.get("corpus"), **{key: harvest.get(key) for key in ("seed", "text_column", "split", "dataset_config")}}
        info = _sae_info(model=cache.model_name, context_size=harvest.get("context_size"), corpus=corpus,
                         harvest_contexts=cache.manifest.get("contexts_done"), source=str(cache.path))
        hooks, scales, d_in = [hook], {hook: cache.scale_factor(hook)}, cache.d_model
        stream = _KeyedBatches(batches, hook) if len(sweep) > 1 else batches
        say(f"training on {cache.path} ({cache.n_tokens:,} tokens at {hook}, d_model {d_in}; {args.tokens / cache.n_tokens:.1f} epochs)")
    else:
        from .data import ActivationStream, Harvester, open_corpus
        from .model import EMBEDDED_MODEL, load_model

        model_name = args.model or EMBEDDED_MODEL
        loaded = load_model(model_name, device=dist.device if dist.world > 1 else args.device, dtype=args.model_dtype)
        hooks = args.hook or [_middle_resid(loaded)]
        corpus_obj = open_corpus(args.corpus or "starter", seed=args.seed, text_column=args.text_column, split=args.split, dataset_config=args.dataset_config)
        if args.distribute == "data":
            corpus_obj = shard_corpus(corpus_obj)  # rank r reads every N-th document
        harvester = Harvester(loaded, corpus_obj, hooks, args.context_size, 16)
        stream = ActivationStream(harvester, args.batch_size, seed=args.seed, max_tokens=args.tokens)
        scales, d_in = stream.scale_factors, loaded.d_model
        # The stream reads at most the training tokens plus its shuffle buffer: held-out text starts after that.
        read_at_most = -(-(args.tokens + stream.shuffle_tokens) // (args.context_size - 1)) + 16
        info = _sae_info(model=model_name, context_size=args.context_size, corpus=corpus_obj.describe(), harvest_contexts=read_at_most, source="stream")
        say(f"training straight from {model_name} at {', '.join(hooks)} on corpus {corpus_obj.spec}")
    configs = {}
    for hook in hooks:
        for d_sae, k in sweep:
            sparsity: dict[str, float] = {}
            if args.arch == "jumprelu":
                sparsity["target_l0"] = float(k)
            if args.l1_coefficient is not None:
                sparsity["l1_coefficient"] = args.l1_coefficient
            cfg = TrainConfig(d_in=d_in, total_tokens=args.tokens, d_sae=d_sae, architecture=args.arch, k=k,
                              batch_size=args.batch_size, optimizer=optimizer_config(args.optimizer, args.lr), seed=args.seed,
                              hook_name=hook, activation_scale=scales[hook],
                              **sparsity)
            name = "." if len(hooks) * len(sweep) == 1 else f"{hook}-{args.arch}-{d_sae}-k{k}"
            configs[name] = cfg
    memory = describe_memory(configs.values(), dist.world if args.distribute == "data" else 1)
    if memory:
        say(memory)
    if dist.world > 1:
        results = train_distributed(configs, stream, args.out, info=info, single=list(configs) == ["."], mode=args.distribute,
                                    split="rows" if args.activations else "own")
    elif list(configs) == ["."]:
        from .sae import train_sae

        results = {".": train_sae(configs["."], stream, args.out, info=info)}
    else:
        results = train_saes(configs, stream, args.out, info=info)
    for name, result in results.items():
        folder = result.folder
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.final_metrics.items() if isinstance(v, (int, float)))
        status = "" if result.complete else " (stopped early: the activation stream ended)"
        say(f"saved {folder}: {result.tokens:,} tokens, {result.steps} steps{status}; {metrics}")
    if results:
        say(f"next: monoscope eval --sae {next(iter(results.values())).folder}")
    return 0


class _KeyedBatches:
    """A single-hook batch source as the {hook: tensor} stream a sweep trains from; keeps iter_from."""

    def __init__(self, batches, hook: str):
        self.batches, self.hook = batches, hook

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, index: int):
        return ({self.hook: b} for b in self.batches.iter_from(index))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train sparse autoencoders on activations", description="Train SAEs from a harvest cache (many epochs, cheap resume) or straight from the model. Comma-separated --d-sae/--k values train a sweep from one pass. Re-running an interrupted command resumes from its last checkpoint.")
    p.add_argument("--activations", help="harvest cache folder, or a .safetensors file with an 'activations' tensor [N, d_in]")
    p.add_argument("--d-sae", type=_int_list, required=True, help="latents (comma-separated for a sweep)")
    p.add_argument("--k", type=_int_list, default=[32], help="active latents per token: exact for topk, on average for batchtopk, the target L0 for jumprelu; unused by relu (comma-separated for a sweep; default 32)")
    p.add_argument("--tokens", type=positive_int, required=True, help="training tokens (epochs over a cache are taken as needed)")
    p.add_argument("--out", required=True, help="output folder (SAELens format: cfg.json + sae_weights.safetensors)")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "jumprelu", "relu"], help="architecture (default: topk)")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per step (default: 4096)")
    p.add_argument("--optimizer", default=None, choices=["adam", "signum", "adam_sf"], help="optimiser: adam (default), signum (schedule-free sign-SGD, sparsify's default) or adam_sf (schedule-free Adam); see docs/sae.md")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the optimiser's rule, base / sqrt(d_sae / 16384); adam: 8e-4 at 16384 latents for topk/batchtopk, 2e-4 for jumprelu/relu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l1-coefficient", type=non_negative_float, default=None, help="relu: weight of the L1 penalty, which sets L0 (default: 5)")
    p.add_argument("--hook", action="append", help="hook point (needed for a cache with several, or when streaming)")
    _add_model_args(p, default_model=None)
    _add_corpus_args(p, default=None)
    p.add_argument("--context-size", type=positive_int, default=128, help="when streaming: tokens per context (default: 128)")
    p.add_argument("--distribute", choices=["data", "spread"], default="data", help="under torchrun: data = every rank trains every SAE on its share of each batch (default); spread = the SAEs of a sweep are dealt to the ranks")
    p.set_defaults(func=cmd_train)


# ---------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace, loaded=None) -> int:
    from ._io import atomic_write_json
    from .data import open_corpus
    from .model import load_model
    from .sae import load_sae
    from .sae.io import sae_hook_point, sae_model_name
    from .sae.lm_eval import evaluate_sae, held_out_skip

    sae = load_sae(args.sae)
    model_name = args.model or sae_model_name(sae)
    if not model_name:
        raise MonoscopeError("the SAE does not name its model; pass --model")
    hook = args.hook or sae_hook_point(sae)
    if not hook:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass --hook")
    trained_corpus = sae.info.get("corpus") or {}
    spec = args.corpus or trained_corpus.get("spec") or "starter"
    seed = trained_corpus.get("seed", 0) if args.seed is None else args.seed
    corpus = open_corpus(spec, seed=seed, text_column=args.text_column, split=args.split, dataset_config=args.dataset_config)
    context_size = args.context_size or sae.info.get("context_size") or sae.cfg.metadata.get("context_size") or 128
    loaded = loaded if loaded is not None and loaded.name == model_name else load_model(model_name, device=args.device, dtype=args.model_dtype)
    skip = held_out_skip(sae.info, corpus)
    result = evaluate_sae(sae, loaded, corpus, hook_point=hook, tokens=args.tokens, context_size=int(context_size), skip_contexts=skip,
                          seed=args.sample_seed, untouched_positions=args.untouched_positions)
    atomic_write_json(Path(args.sae) / "eval.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    region = f"contexts {skip:,}-{skip + result['held_out_region_contexts']:,}"
    print(f"{args.sae}: {hook} of {model_name}, {result['tokens']:,} held-out tokens in {result['contexts']} contexts sampled from "
          f"{region}" + (" (after the training contexts)" if skip else "") + f"; [95% bootstrap interval over contexts]")
    rows = [
        ("L0", "l0"), ("explained variance", "explained_variance"), ("FVU", "fvu"), ("MSE", "mse"), ("cosine(x, x_hat)", "cosine_similarity"),
        ("shrinkage", "shrinkage"), ("alive latents", "frac_alive"), ("denser than 1%", "frac_dense_1pct"), ("denser than 10%", "frac_dense_10pct"),
        ("CE clean", "ce_clean"), ("CE with SAE", "ce_sae"), ("CE zero-ablated", "ce_zero_ablation"), ("CE mean-ablated", "ce_mean_ablation"),
        ("ce_loss_score", "ce_loss_score"), ("delta loss (CE_sae - CE_clean)", "delta_loss"), ("ce_loss_score (mean abl.)", "ce_loss_score_mean_ablation"),
        ("KL div score", "kl_div_score"),
    ]
    intervals = result.get("intervals", {})
    for label, key in rows:
        low_high = intervals.get(key)
        spread = f"  [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""
        print(f"  {label:<31}{result[key]:.4f}{spread}")
    print(f"written to {Path(args.sae) / 'eval.json'}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an SAE: reconstruction and LM loss with the SAE spliced in", description="SAEBench-style metrics on held-out text; writes eval.json next to the SAE.")
    p.add_argument("--sae", required=True, help="SAE folder")
    _add_model_args(p, default_model=None)
    _add_corpus_args(p, default=None)
    p.add_argument("--tokens", type=positive_int, default=8192, help="held-out tokens (default: 8192)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's own)")
    p.add_argument("--context-size", type=positive_int, default=None, help="default: the SAE's training context size")
    p.add_argument("--seed", type=int, default=None, help="corpus seed (default: the training corpus seed, so held-out text follows the training text)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the held-out contexts sampled across the held-out text and of the bootstrap (default: 0)")
    p.add_argument("--untouched-positions", type=positive_int, default=1, help="positions at the start of each context left as they are and not scored: 1 = BOS (default); 2 also skips the first token after BOS, whose outsized activations dominate FVU in some models (SmolLM2)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------- quickstart


#: The quickstart's hook point: a third of the way up SmolLM2-135M's 30 layers. Concept features were as
#: findable there as at layers 12 and 15 and a little closer to their concepts (docs/steering.md, "Concepts"),
#: and the harvest stops there, so the same time buys twice the tokens of layer 15.
QUICKSTART_HOOK = "resid_post.9"


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Harvest -> train -> evaluate on the embedded default, each step resumable, then say what to run next."""
    from .model import EMBEDDED_MODEL, load_model

    out = Path(args.out)
    acts, sae_dir = out / "activations", out / "sae"
    print(f"monoscope quickstart: {EMBEDDED_MODEL} + starter corpus -> {out}")
    loaded = load_model(EMBEDDED_MODEL)
    hook = args.hook
    print(f"\n[1/4] harvest {args.tokens:,} tokens of {hook} activations")
    harvest_args = build_parser().parse_args(["harvest", "--hook", hook, "--tokens", str(args.tokens), "--out", str(acts)])
    cmd_harvest(harvest_args, loaded=loaded)
    print(f"\n[2/4] train a TopK SAE (d_sae {args.d_sae}, k {args.k}) on {args.train_tokens:,} tokens")
    if (sae_dir / "sae_weights.safetensors").is_file():
        print(f"{sae_dir} already holds a trained SAE; delete it to train again")
    else:
        cmd_train(build_parser().parse_args(["train", "--activations", str(acts), "--d-sae", str(args.d_sae), "--k", str(args.k),
                                              "--tokens", str(args.train_tokens), "--out", str(sae_dir)]))
    print(f"\n[3/4] evaluate on {args.eval_tokens:,} held-out tokens (the first token after BOS, whose outsized activations "
          "would decide FVU, is left out: --untouched-positions 2)")
    cmd_eval(build_parser().parse_args(["eval", "--sae", str(sae_dir), "--tokens", str(args.eval_tokens), "--untouched-positions", "2"]),
             loaded=loaded)
    print(f"\n[4/4] build the feature database from {args.analyze_tokens:,} tokens")
    db = sae_dir / "features.db"
    if db.is_file():
        print(f"{db} already exists; `monoscope analyze --sae {sae_dir}` rebuilds it")
    else:
        from .features.cli import cmd_analyze

        cmd_analyze(build_parser().parse_args(["analyze", "--sae", str(sae_dir), "--tokens", str(args.analyze_tokens)]))
    _print_sample_features(db)
    print("\nnext:")
    print(f"  monoscope serve --sae {sae_dir}                     # browse, scan and steer in the web UI at http://127.0.0.1:8000")
    print(f"  monoscope features search --sae {sae_dir} \"python code\"")
    print(f"  monoscope steer --sae {sae_dir} --toward \"the ocean\" --prompt \"Tell me a story\" --max-new-tokens 40")
    print(f"  monoscope steer --sae {sae_dir} --feature ID=clamp:8x --prompt \"Tell me a story\" --max-new-tokens 40")
    print(f"  monoscope chat --sae {sae_dir}                      # /set ID 8x between turns")
    return 0


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
    scored.sort(key=lambda pair: (-round(pair[0], 2), "→" in pair[1].label))
    print(f"\nsome features (of {store.n_features:,}) whose label tells held-out examples from random text best, "
          "word labels first (embedding score: 0.5 chance, 1 perfect):")
    for score, record in scored[:n]:
        print(f"  #{record.id:<6} density {record.density:6.2%}  score {score:.2f}  {record.label}")
    if held:
        values = sorted(held.values())
        print(f"  all {len(values):,} scored labels: median {values[len(values) // 2]:.2f}, "
              f"{sum(v >= 0.8 for v in values) / len(values):.0%} at 0.8 or more")


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the embedded model and starter corpus", description="Harvest activations from the embedded SmolLM2-135M-Instruct on the offline starter corpus, train a TopK SAE, evaluate it and build its feature database. Every step resumes if interrupted.")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    p.add_argument("--hook", default=QUICKSTART_HOOK, help=f"hook point (default: {QUICKSTART_HOOK}, chosen by benchmarks/bench_concepts.py)")
    p.add_argument("--tokens", type=positive_int, default=400_000, help="tokens to harvest (default: 400000)")
    p.add_argument("--train-tokens", type=positive_int, default=2_000_000, help="training tokens, epochs over the harvest (default: 2000000)")
    p.add_argument("--d-sae", type=positive_int, default=4608, help="latents (default: 4608 = 8 x 576)")
    p.add_argument("--k", type=positive_int, default=32, help="active latents per token (default: 32)")
    p.add_argument("--eval-tokens", type=positive_int, default=8192, help="held-out evaluation tokens (default: 8192)")
    p.add_argument("--analyze-tokens", type=positive_int, default=100_000, help="tokens for the feature database (default: 100000)")
    p.set_defaults(func=cmd_quickstart)


# ---------------------------------------------------------------- entry point

from .features.cli import register as register_features  # noqa: E402
from .features.explain_cli import register_explain  # noqa: E402
from .steer.cli import register as register_steer  # noqa: E402
from .server.cli import register as register_server  # noqa: E402
from .sae.cli_interop import register as register_import_sae  # noqa: E402
from .features.export.cli import register as register_export  # noqa: E402

_COMMANDS: list[Callable] = [_add_quickstart, _add_harvest, _add_train, _add_eval, register_features, register_explain, register_steer, register_server, register_import_sae, register_export]


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
        print("\nmonoscope: interrupted; harvest shards and training checkpoints already written are kept, and the same command continues from them", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
