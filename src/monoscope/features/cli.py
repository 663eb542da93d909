"""CLI for the feature database: `monoscope analyze`, `monoscope features search|show`, `monoscope scan`.

`register(subparsers)` adds them to the top-level parser. Parsing only; heavy imports happen when a command
runs, so `monoscope --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from ..argtypes import positive_int as _positive_int
from ..cli_common import (
    Parsers,
    add_context_size_arg,
    add_corpus_args,
    add_device_args,
    add_hook_arg,
    add_json_flag,
    add_model_arg,
)
from ..errors import MonoscopeError

if TYPE_CHECKING:
    from .analyze import AnalysisReport
    from .store import FeatureStore


def _feature_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a feature id is a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"feature ids start at 0, got {text}")
    return value


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default))


def _json_default(obj: object) -> object:
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(type(obj).__name__)


def _clean(obj: object) -> object:
    """JSON-safe: NaN/inf -> None."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --hook, --device, --model-dtype of a command that reopens the model an SAE reads."""
    add_model_arg(p, None, "the SAE's model")
    add_hook_arg(p, default_help="the SAE's own")
    add_device_args(p)


def _add_store_args(p: argparse.ArgumentParser, sae_required: bool = False) -> None:
    p.add_argument("--sae", required=sae_required, help="SAE folder (its database is SAE/features.db)")
    p.add_argument("--db", default=None, help="feature database file (default: SAE/features.db)")


# ---------------------------------------------------------------- analyze


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import AnalysisConfig, analyze_sae

    cfg = AnalysisConfig(
        tokens=args.tokens,
        context_size=args.context_size,
        batch_size=args.batch_size,
        n_top=args.top_examples,
        map=args.map,
        embeddings=not args.no_embeddings,
        seed=args.seed,
    )
    report = analyze_sae(
        args.sae,
        model=args.model,
        hook=args.hook,
        corpus=args.corpus,
        db=args.db,
        device=args.device,
        model_dtype=args.model_dtype,
        text_column=args.text_column,
        split=args.split,
        dataset_config=args.dataset_config,
        corpus_seed=args.corpus_seed,
        config=cfg,
        progress=not args.json,
    )
    if args.json:
        _print_json(_clean(report.to_dict()))
    else:
        print_analysis(report, args.sae, args.tokens)
    return 0


def print_analysis(report: "AnalysisReport", sae_dir: str | os.PathLike[str], tokens: int) -> None:
    """What `monoscope analyze` prints of the database it wrote, and what to run next."""
    print(
        f"analysed {report.tokens:,} tokens ({report.contexts:,} contexts) at {report.tokens_per_second:,.0f} tok/s "
        f"in {report.seconds:.1f} s"
    )
    print(
        f"  database:  {report.db}  ({report.db_bytes / 1e6:.1f} MB, {report.n_features:,} features, "
        f"{report.dead_features:,} never fired)"
    )
    print(f"  map:       {report.map_method or 'none'}")
    if report.labels_carried:
        print(f"  labels:    kept {report.labels_carried} labels from the previous database")
    if report.corpus_exhausted:
        print(f"  note: the corpus ended before {tokens:,} tokens")
    print(
        f'next: monoscope features search --sae {sae_dir} "some words"   |   monoscope features show --sae {sae_dir} 0'
    )


def _add_analyze(sub: Parsers) -> None:
    from .analyze import AnalysisConfig

    defaults = AnalysisConfig()
    p = sub.add_parser(
        "analyze",
        help="build the feature database of an SAE (examples, stats, logit effects, neighbours, map, labels)",
        description="Run the SAE over a corpus in one streaming pass and write a searchable feature database "
        "(default: SAE/features.db). Model, hook point and corpus default to the SAE's own. "
        "Re-running starts over; the previous database stays until the new one is complete.",
    )
    p.add_argument("--sae", required=True, help="SAE folder (cfg.json, sae_weights.safetensors, monoscope.json)")
    _add_model_args(p)
    add_corpus_args(
        p, None, default_help="the SAE's training corpus", text_column=None, split=None, recorded="the SAE's"
    )
    p.add_argument("--corpus-seed", type=int, default=None, help="corpus shuffling seed (default: the SAE's)")
    p.add_argument(
        "--tokens", type=_positive_int, default=defaults.tokens, help=f"tokens to analyse (default: {defaults.tokens})"
    )
    p.add_argument("--db", default=None, help="database file to write (default: SAE/features.db)")
    add_context_size_arg(p, defaults.context_size, "the SAE's")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help=f"contexts per forward pass (default: {defaults.batch_size})",
    )
    p.add_argument(
        "--top-examples",
        type=_positive_int,
        default=defaults.n_top,
        help=f"top-activating contexts kept per feature (default: {defaults.n_top})",
    )
    p.add_argument(
        "--map",
        default=defaults.map,
        choices=["auto", "umap", "pca", "none"],
        help="2-D map of the features (default: auto = UMAP when installed)",
    )
    p.add_argument(
        "--no-embeddings", action="store_true", help="skip label embeddings and embedding scores (no search by meaning)"
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"sampling seed (default: {defaults.seed})")
    add_json_flag(p)
    p.set_defaults(func=cmd_analyze)


# ---------------------------------------------------------------- features search / show


def _store(args: argparse.Namespace) -> "FeatureStore":
    from .store import FeatureStore

    return FeatureStore.for_sae(args.sae, args.db)


def cmd_search(args: argparse.Namespace) -> int:
    from .render import render_example_hits, render_search

    store = _store(args)
    if args.example:
        if args.query:
            raise MonoscopeError("give either words to search for or --example texts, not both")
        if not args.sae:
            raise MonoscopeError("search by example runs the model and SAE: pass --sae SAE_FOLDER")
        from .loading import open_sae_and_model
        from .search import features_for_examples

        sae, loaded, hook = open_sae_and_model(
            args.sae, model=args.model, hook=args.hook, device=args.device, dtype=args.model_dtype
        )
        hits = features_for_examples(
            args.example, sae=sae, loaded=loaded, hook=hook, store=store, contrast=args.contrast, limit=args.limit
        )
        if args.json:
            _print_json(
                _clean(
                    {"examples": args.example, "contrast": args.contrast or [], "results": [h.to_dict() for h in hits]}
                )
            )
        else:
            print(render_example_hits(hits))
        return 0
    if args.contrast:
        raise MonoscopeError("--contrast goes with --example texts")
    if not args.query:
        raise MonoscopeError(
            'give words to search for, e.g. monoscope features search --sae DIR "golden gate", or --example TEXT'
        )
    from .search import search_features

    hits = search_features(store, args.query, limit=args.limit, mode=args.mode)
    if args.json:
        _print_json(
            _clean(
                {"query": args.query, "mode": args.mode, "notes": hits.notes, "results": [h.to_dict() for h in hits]}
            )
        )
    else:
        print(render_search(hits))
        for note in hits.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    fid = store.check_id(args.id)
    if args.json:
        edges, counts = store.histogram(fid)
        effects = store.logit_effects(fid)
        out = {
            **store.feature(fid).to_dict(),
            "label_score": store.label_scores([fid]).get(fid),
            "model": store.meta.get("model"),
            "hook_point": store.meta.get("hook_point"),
            "tokens_analysed": store.tokens_analysed,
            "histogram": {"edges": edges, "counts": counts},
            "logit_effects": {k: [vars(t) for t in v] for k, v in effects.items()},
            "neighbours": [vars(n) for n in store.neighbours(fid)],
            "labels": [lab.to_dict() for lab in store.labels(fid)],
            "examples": {
                kind: [e.to_dict() for e in store.examples(fid, kind, limit=args.examples if kind == "top" else None)]
                for kind in ("top", "quantile", "random")
            },
        }
        _print_json(_clean(out))
        return 0
    from .render import render_feature, use_colour

    print(render_feature(store, fid, colour=use_colour(), n_examples=args.examples))
    return 0


def cmd_family(args: argparse.Namespace) -> int:
    from .family import feature_family, open_store_if_any
    from .loading import open_sae

    source = open_sae(args.sae, args.device)
    others = [(str(d), open_sae(d, args.device)) for d in args.across]
    store = open_store_if_any(args.sae) if not args.no_coactivation else None
    loaded = hook = None
    if store is not None:
        from .loading import open_sae_and_model

        source, loaded, hook = open_sae_and_model(
            args.sae, model=args.model, hook=args.hook, device=args.device, dtype=args.model_dtype
        )
    family = feature_family(
        source,
        args.id,
        others,
        source_name=str(args.sae),
        top=args.top,
        store=store,
        other_stores=[open_store_if_any(d) for d, _ in others],
        loaded=loaded,
        hook=hook,
    )
    if args.json:
        _print_json(_clean(family.to_dict()))
        return 0
    from .render import render_family

    print(render_family(family))
    return 0


def _add_features(sub: Parsers) -> None:
    p = sub.add_parser(
        "features",
        help="search and show features of an analysed SAE",
        description="Browse the feature database that `monoscope analyze` wrote.",
    )
    fsub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND")
    fsub.required = True

    s = fsub.add_parser(
        "search",
        help="find features by words, by meaning, or by example texts",
        description="Search feature labels by words (FTS5) and meaning (embeddings), fused; or, with "
        "--example, find the features most specific to example texts (runs the model).",
    )
    _add_store_args(s)
    s.add_argument("query", nargs="?", default=None, help="words to search for")
    s.add_argument("--example", action="append", default=None, help="an example text; repeat for several")
    s.add_argument(
        "--contrast", action="append", default=None, help="a contrast text for --example; repeat for several"
    )
    s.add_argument(
        "--mode",
        default="hybrid",
        choices=["hybrid", "words", "meaning"],
        help="word search, meaning search, or both (default)",
    )
    s.add_argument("--limit", type=_positive_int, default=20, help="results to show (default: 20)")
    _add_model_args(s)
    add_json_flag(s, "JSON")
    s.set_defaults(func=cmd_search)

    sh = fsub.add_parser(
        "show",
        help="a feature's dashboard: examples, histogram, logit effects, neighbours",
        description="Print one feature: label, statistics, activation histogram, top examples with "
        "highlighted tokens, promoted/suppressed tokens and nearest features.",
    )
    _add_store_args(sh)
    sh.add_argument("id", type=_feature_id, help="feature id")
    sh.add_argument("--examples", type=_positive_int, default=5, help="top examples to show (default: 5)")
    add_json_flag(sh, "JSON")
    sh.set_defaults(func=cmd_show)

    fa = fsub.add_parser(
        "family",
        help="a feature's closest features in wider (or narrower) SAEs of the same hook point",
        description="Feature splitting: for a feature of one SAE, its closest features in each other SAE of "
        "the same model and hook point, by decoder cosine and, when the SAE has a feature "
        "database, by co-activation on the analysed tokens (runs the model). Sorted by cosine.",
    )
    fa.add_argument("--sae", required=True, help="the SAE the feature belongs to")
    fa.add_argument(
        "--across",
        action="append",
        required=True,
        metavar="DIR",
        help="another SAE of the same model and hook point; repeat for several",
    )
    fa.add_argument("id", type=_feature_id, help="feature id in --sae")
    fa.add_argument("--top", type=_positive_int, default=5, help="matches per SAE by each measure (default: 5)")
    fa.add_argument("--no-coactivation", action="store_true", help="decoder cosine only (does not load the model)")
    _add_model_args(fa)
    add_json_flag(fa, "JSON")
    fa.set_defaults(func=cmd_family)


# ---------------------------------------------------------------- scan


def cmd_scan(args: argparse.Namespace) -> int:
    from .loading import open_sae_and_model
    from .scan import scan_text
    from .store import FeatureStore, default_db_path

    sae, loaded, hook = open_sae_and_model(
        args.sae, model=args.model, hook=args.hook, device=args.device, dtype=args.model_dtype
    )
    db = args.db or default_db_path(args.sae)
    store = None
    from pathlib import Path

    if Path(db).is_file():
        store = FeatureStore(db, sae_dir=args.sae)
    elif args.db:
        raise MonoscopeError(f"no feature database at {args.db}: run `monoscope analyze --sae {args.sae}` first")
    result = scan_text(args.text, sae=sae, loaded=loaded, hook=hook, store=store, top=args.top)
    if args.json:
        _print_json(_clean(result.to_dict()))
        return 0
    from .render import render_scan, use_colour

    print(render_scan(result, colour=use_colour()))
    return 0


def _add_scan(sub: Parsers) -> None:
    p = sub.add_parser(
        "scan",
        help="which features fire on each token of a text",
        description="Run the model and SAE on a text and list, for every token, the features that fire on "
        "it (strongest first) with their labels.",
    )
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("text", help="the text to scan")
    p.add_argument("--db", default=None, help="feature database for labels (default: SAE/features.db when present)")
    p.add_argument("--top", type=_positive_int, default=5, help="features per token (default: 5)")
    _add_model_args(p)
    add_json_flag(p, "JSON")
    p.set_defaults(func=cmd_scan)


def register(subparsers: Parsers) -> None:
    """Add `analyze`, `features` (search, show) and `scan` to the top-level subparsers."""
    _add_analyze(subparsers)
    _add_features(subparsers)
    _add_scan(subparsers)


if __name__ == "__main__":  # pragma: no cover - `python -m monoscope.features.cli ...` for development
    parser = argparse.ArgumentParser(prog="monoscope")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    try:
        sys.exit(ns.func(ns))
    except MonoscopeError as err:
        print(f"monoscope: error: {err}", file=sys.stderr)
        sys.exit(2)
