"""`monoscope export neuronpedia|parquet`: write a feature database in other tools' formats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...cli_common import Parsers
    from ..store import FeatureStore
    from .report import ExportReport


def _store(args: argparse.Namespace) -> FeatureStore:
    from ..store import FeatureStore

    return FeatureStore.for_sae(args.sae, db=args.db)


def _say(args: argparse.Namespace, report: ExportReport, line: str) -> int:
    """The report as JSON with --json, else one line."""
    print(json.dumps(report.to_dict(), indent=2) if args.json else line)
    return 0


def cmd_export_neuronpedia(args: argparse.Namespace) -> int:
    from .neuronpedia import export_neuronpedia

    sae = None
    if not args.no_vectors:
        from ...sae import load_sae

        sae = load_sae(args.sae)
    with _store(args) as store:
        report = export_neuronpedia(
            store,
            args.out,
            model_id=args.model_id,
            source_id=args.source_id,
            sae=sae,
            batch_size=args.batch_size,
            release_id=args.release_id,
            creator_name=args.creator_name,
            url=args.url,
            hf_repo_id=args.hf_repo_id,
            hf_folder_id=args.hf_folder_id,
            include_vectors=not args.no_vectors,
        )
    return _say(
        args,
        report,
        f"wrote {report.features:,} features, {report.activations:,} activation examples and "
        f"{report.explanations:,} explanations to {report.folder} (Neuronpedia dataset layout)",
    )


def cmd_export_parquet(args: argparse.Namespace) -> int:
    from .parquet import export_parquet

    with _store(args) as store:
        report = export_parquet(store, args.out)
    return _say(
        args,
        report,
        f"wrote {report.features:,} features, {report.activations:,} examples and "
        f"{report.explanations:,} labels to {Path(report.folder)}/*.parquet",
    )


def register(subparsers: "Parsers") -> None:
    """Add `export neuronpedia` and `export parquet` to the top-level subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a feature database (Neuronpedia layout, Parquet)",
        description="Write an SAE's feature database (from `monoscope analyze`) in other formats.",
    )
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sae", required=True, help="SAE folder (its features.db is read)")
    common.add_argument("--db", default=None, help="feature database file (default: SAE_FOLDER/features.db)")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--json", action="store_true", help="print a JSON summary")
    n = sub.add_parser(
        "neuronpedia",
        parents=[common],
        help="Neuronpedia's dataset layout ({model}/{source}/...jsonl.gz)",
        description="Write features, activation examples and explanations as Neuronpedia batch-N.jsonl.gz files.",
    )
    n.add_argument(
        "--model-id", default=None, help="Neuronpedia model id (default: the analysed model's name, lower-case)"
    )
    n.add_argument(
        "--source-id", default=None, help="Neuronpedia source id LAYER-SET (default: e.g. 15-monoscope-res-4k)"
    )
    n.add_argument("--release-id", default=None, help="release name (default: the source set name)")
    n.add_argument("--creator-name", default="monoscope", help="creator shown on Neuronpedia")
    n.add_argument("--url", default=None, help="URL of the paper or release")
    n.add_argument("--hf-repo-id", default=None, help="hub repository holding the SAE weights")
    n.add_argument("--hf-folder-id", default=None, help="folder of the SAE in that repository")
    n.add_argument("--batch-size", type=int, default=128, help="features per batch file (default: 128)")
    n.add_argument(
        "--no-vectors", action="store_true", help="leave out decoder vectors (smaller; no steering on Neuronpedia)"
    )
    n.set_defaults(func=cmd_export_neuronpedia)
    q = sub.add_parser(
        "parquet", parents=[common], help="Parquet tables: features, examples, labels, logit effects, neighbours"
    )
    q.set_defaults(func=cmd_export_parquet)
