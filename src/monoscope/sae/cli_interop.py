"""`monoscope import-sae`: convert an SAE from SAELens, sparsify, Gemma Scope or the hub to a monoscope folder."""

from __future__ import annotations

import argparse
import json

from ..cli_common import Parsers, add_json_flag


def cmd_import_sae(args: argparse.Namespace) -> int:
    from ..model import HookPoint
    from .io import save_sae
    from .loader import load_any_sae

    sae = load_any_sae(args.sae, subpath=args.sae_subpath)
    info = dict(sae.info)
    if args.hook:
        info["hook_point"] = str(HookPoint.parse(args.hook))
    if args.model:
        info["model"] = args.model
    for key, target in (("hook_point", "hook_name"), ("model", "model_name")):
        if info.get(key) and not info.get(target):
            info[target] = info[key]
    folder = save_sae(sae, args.out, info)
    summary = {
        "out": str(folder),
        "source": info.get("source"),
        "format": info.get("format", "saelens"),
        "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "hook_point": info.get("hook_point"),
        "model": info.get("model"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"imported {summary['source']} ({summary['format']}, {sae.cfg.architecture}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}) -> {folder}"
    )
    missing = [flag for flag, key in (("--hook", "hook_point"), ("--model", "model")) if not info.get(key)]
    if missing:
        print(
            f"  the source does not say its {' and '.join(k[2:] for k in missing)}; pass {' and '.join(missing)} to record it"
        )
    else:
        print(f"  reads {info['hook_point']} of {info['model']}; next: monoscope analyze --sae {folder}")
    return 0


def register(subparsers: Parsers) -> None:
    p = subparsers.add_parser(
        "import-sae",
        help="convert an SAE from SAELens, sparsify, Gemma Scope or the HF hub into a monoscope folder",
        description="Read an SAE written by another tool (SAELens folder incl. gated, sparsify folder, Gemma Scope "
        "params.npz, or hf://ORG/REPO/SUB/PATH) and save it as a monoscope/SAELens folder every command reads.",
    )
    p.add_argument(
        "--sae", required=True, help="folder, params.npz, hf://ORG/REPO/SUB/PATH, or ORG/REPO with --sae-subpath"
    )
    p.add_argument(
        "--sae-subpath",
        default=None,
        help="folder inside the repository or folder (e.g. layer_12/width_16k/average_l0_82, layers.6)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="the model the SAE reads, when the source does not say")
    p.add_argument(
        "--hook",
        default=None,
        help="hook point (resid_post.12, blocks.12.hook_resid_post, layers.12), when the source does not say",
    )
    add_json_flag(p)
    p.set_defaults(func=cmd_import_sae)
