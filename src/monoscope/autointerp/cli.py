"""`monoscope explain`: label an SAE's features with any LLM behind an OpenAI-compatible endpoint.

Argument parsing, feature selection and printing only; the work is `monoscope.autointerp.run.explain_features`.
Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from ..argtypes import non_negative_int, positive_int
from ..errors import MonoscopeError

if TYPE_CHECKING:
    from ..cli_common import Parsers
    from ..features.store import FeatureStore
    from .client import LLMClient
    from .run import LabelRun


# ---------------------------------------------------------------- the LLM endpoint options


def add_llm_args(p: argparse.ArgumentParser) -> None:
    """The endpoint options shared by commands that talk to an LLM."""
    p.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible API base URL, e.g. http://localhost:8000/v1 "
        "(default: $MONOSCOPE_LLM_BASE_URL, $OPENAI_BASE_URL)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name at that endpoint (default: $MONOSCOPE_LLM_MODEL, or the only model the endpoint serves)",
    )
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the API key (default: $MONOSCOPE_LLM_API_KEY, $OPENAI_API_KEY)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (default: 120)")
    p.add_argument(
        "--retries",
        type=int,
        default=4,
        help="retries on 429/5xx/timeouts/connection errors, with backoff (default: 4)",
    )
    p.add_argument(
        "--input-cost", type=float, default=None, metavar="USD", help="price per 1M input tokens, for cost accounting"
    )
    p.add_argument(
        "--output-cost", type=float, default=None, metavar="USD", help="price per 1M output tokens, for cost accounting"
    )
    p.add_argument(
        "--max-cost",
        type=float,
        default=None,
        metavar="USD",
        help="stop sending requests once this much is spent (needs the prices)",
    )


def client_from_args(args: argparse.Namespace) -> LLMClient:
    """An `LLMClient` from the options of `add_llm_args`."""
    from .client import LLMClient

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise MonoscopeError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    return LLMClient(
        base_url=args.base_url,
        model=args.model,
        api_key=api_key,
        timeout=args.timeout,
        max_retries=args.retries,
        concurrency=args.concurrency,
        input_cost_per_m=args.input_cost,
        output_cost_per_m=args.output_cost,
        max_cost=args.max_cost,
    )


# ---------------------------------------------------------------- which features


def parse_feature_spec(spec: str, n_features: int | None = None) -> list[int] | str:
    """`"0-99"`, `"3,7,10-12"` -> ids; `"all"` and `"top-density"` are returned as they are (the caller knows
    the store)."""
    spec = spec.strip().lower()
    if spec in ("all", "top-density"):
        return spec
    ids: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(\d+)\s*(?:-|\.\.)\s*(\d+)", part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise MonoscopeError(f"--features {part}: the range ends before it starts")
            ids.extend(range(lo, hi + 1))
        elif part.isdigit():
            ids.append(int(part))
        elif part:
            raise MonoscopeError(f"--features {spec!r}: use ranges and ids like 0-99,120, or 'all', or 'top-density'")
    if not ids:
        raise MonoscopeError("--features selects no features")
    bad = [i for i in ids if n_features is not None and i >= n_features]
    if bad and n_features is not None:
        raise MonoscopeError(
            f"--features: feature {bad[0]} does not exist; the SAE has {n_features} features (0-{n_features - 1})"
        )
    return list(dict.fromkeys(ids))


def select_features(store: FeatureStore, spec: str, limit: int | None) -> list[int]:
    """Feature ids for `--features`: ids/ranges as given; `all` = live features by id; `top-density` = live
    features, most often firing first (default limit 100)."""
    chosen = parse_feature_spec(spec, store.n_features)
    if isinstance(chosen, list):
        return chosen[:limit] if limit else chosen
    records = [r for r in store.features() if not r.dead]
    if chosen == "top-density":
        records.sort(key=lambda r: (-r.density, r.id))
        limit = limit or 100
    ids = [r.id for r in records]
    return ids[:limit] if limit else ids


# ---------------------------------------------------------------- the command


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarize(run: LabelRun, client: LLMClient) -> dict[str, Any]:
    """The `--json` summary of a run (means of the scores over the labelled features)."""
    ok = [r for r in run if r.ok]
    det = [r.detection for r in ok if r.detection is not None]
    fuz = [r.fuzzing for r in ok if r.fuzzing is not None]
    judged = sum(s.n for s in det + fuz)
    return {
        "source": f"llm:{client.model}",
        "endpoint": client.base_url,
        "features": len(run) + run.skipped,
        "labelled": len(ok),
        "failed": run.n_failed,
        "dead": run.n_dead,
        "skipped": run.skipped,
        "stopped": run.stopped,
        "detection_accuracy": _mean([s.balanced_accuracy for s in det]),
        "detection_f1": _mean([s.f1 for s in det]),
        "fuzzing_accuracy": _mean([s.balanced_accuracy for s in fuz]),
        "fuzzing_f1": _mean([s.f1 for s in fuz]),
        "embedding_score": _mean([r.embedding_score for r in ok]),
        "parse_failure_rate": (sum(s.n_unparsed for s in det + fuz) / judged) if judged else None,
        "non_strict_explanations": sum(1 for r in ok if not r.strict),
        "usage": run.usage.to_dict(),
        "seconds": round(run.seconds, 3),
        "errors": [{"feature_id": r.feature_id, "error": r.error} for r in run if r.error and not r.dead][:50],
    }


def print_summary(
    summary: dict[str, Any],
    run: LabelRun,
    client: LLMClient,
    args: argparse.Namespace,
    *,
    n_selected: int,
    db_path: object,
) -> None:
    print(
        f"explained {summary['labelled']} of {n_selected} features with {summary['source']} ({client.base_url})"
        + (f"; {summary['failed']} failed" if summary["failed"] else "")
        + (f"; {summary['dead']} dead (no firing examples)" if summary["dead"] else "")
        + (f"; {run.skipped} already labelled by this model (--overwrite redoes them)" if run.skipped else "")
    )
    if not args.no_score and summary["labelled"]:
        print(
            f"  detection: balanced accuracy {_fmt(summary['detection_accuracy'])}, "
            f"F1 {_fmt(summary['detection_f1'])}   "
            f"fuzzing: balanced accuracy {_fmt(summary['fuzzing_accuracy'])}, F1 {_fmt(summary['fuzzing_f1'])}   "
            f"embedding AUROC {_fmt(summary['embedding_score'])}   (means; 0.5 = chance)"
        )
        if summary["parse_failure_rate"]:
            print(
                f"  unreadable judge answers: {summary['parse_failure_rate']:.1%} of judged excerpts (counted as wrong)"
            )
    u = run.usage
    cost = f", ${u.cost_usd:.4f}" if client.has_prices else ""
    print(
        f"  usage: {u.requests} requests ({u.retries} retried), {u.prompt_tokens:,} in / {u.completion_tokens:,} out "
        f"tokens{cost}, {run.seconds:.1f} s"
    )
    if summary["labelled"]:
        print(f"  labels saved to {db_path} (source {summary['source']})")
    for err in summary["errors"][:5]:
        print(f"  feature {err['feature_id']}: {err['error']}")
    if args.report:
        print(f"  report: {args.report}")


def cmd_explain(args: argparse.Namespace) -> int:
    from .._io import atomic_write_bytes
    from ..features.store import FeatureStore
    from .config import ExplainConfig
    from .run import explain_features

    client = client_from_args(args)
    with FeatureStore.for_sae(args.sae, db=args.db) as store:
        ids = select_features(store, args.features, args.limit)
        if not ids:
            raise MonoscopeError(f"--features {args.features} selects no live features in {store.path}")
        cfg = ExplainConfig(
            n_top=args.n_top,
            n_quantile=args.n_quantile,
            explain_max_tokens=args.explain_max_tokens,
            judge_max_tokens=args.judge_max_tokens,
        )
        run = explain_features(
            store,
            ids,
            client,
            n_top=args.n_top,
            n_quantile=args.n_quantile,
            score=not args.no_score,
            progress=not args.json,
            overwrite=args.overwrite,
            config=cfg,
        )
        db_path = store.path
    summary = summarize(run, client)
    if args.report:
        lines = "".join(json.dumps(r.to_dict()) + "\n" for r in sorted(run, key=lambda r: r.feature_id))
        atomic_write_bytes(args.report, lines.encode())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, run, client, args, n_selected=len(ids), db_path=db_path)
    if run.stopped:
        print(
            f"monoscope: stopped early: {run.stopped}; labels so far are saved, the same command continues",
            file=sys.stderr,
        )
    return 0


def register_explain(subparsers: "Parsers") -> argparse.ArgumentParser:
    """Add `monoscope explain` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "explain",
        help="label features with an LLM (any OpenAI-compatible endpoint) and score the labels",
        description="Explain SAE features in words with an LLM from their top and quantile examples, score each "
        "explanation on held-out examples (detection, fuzzing, embedding AUROC), and save the labels in the feature "
        "database as source llm:MODEL. Running it again skips features this model already labelled.",
    )
    p.add_argument(
        "--sae", default=None, help="SAE folder whose feature database (features.db, from `monoscope analyze`) to label"
    )
    p.add_argument("--db", default=None, help="feature database file (default: SAE_FOLDER/features.db)")
    add_llm_args(p)
    p.add_argument(
        "--features",
        default="all",
        help="ids and ranges (0-99,120), 'all' live features, or 'top-density' "
        "(most often firing first) (default: all)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="at most this many features (default: all selected; 100 for top-density)",
    )
    p.add_argument("--no-score", action="store_true", help="explain only; skip detection and fuzzing (fewer requests)")
    p.add_argument(
        "--overwrite", action="store_true", help="explain features again even if this model already labelled them"
    )
    p.add_argument(
        "--n-top", type=positive_int, default=10, help="top-activating examples shown to the explainer (default: 10)"
    )
    p.add_argument(
        "--n-quantile",
        type=non_negative_int,
        default=5,
        help="quantile-sampled examples shown to the explainer (default: 5)",
    )
    p.add_argument(
        "--explain-max-tokens",
        type=positive_int,
        default=400,
        help="answer length limit for explanations (default: 400)",
    )
    p.add_argument(
        "--judge-max-tokens",
        type=positive_int,
        default=200,
        help="answer length limit for judge verdicts (default: 200)",
    )
    p.add_argument("--report", default=None, metavar="FILE", help="also write every feature's result as JSON lines")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_explain)
    return p
