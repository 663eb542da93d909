"""What the intervention commands (steer, chat, attribute, suggest, vector, ablate-direction) share: opening the
SAE, its feature database and the model it reads, steering from flags, generation flags, side-by-side printing."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, TextIO

from ..argtypes import positive_int
from ..errors import MonoscopeError

if TYPE_CHECKING:
    from ..model import LoadedModel
    from ..sae import SAE
    from .featuredb import FeatureDB
    from .steering import Steering

#: --model's default in words, for commands that steer an SAE's features (the model falls back to the embedded one).
SAE_MODEL = "the SAE's model, else smollm2-135m-instruct"


def loud_warnings() -> None:
    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"monoscope: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def add_generation_args(p: argparse.ArgumentParser, default_tokens: int = 40) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=default_tokens,
        help=f"tokens to generate (default: {default_tokens})",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="sampling seed (alone it samples at temperature 1; default: greedy)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template to the prompt")


def open_sae(args: argparse.Namespace) -> "SAE | None":
    from .steering import load_steering_sae

    return load_steering_sae(args.sae, device=args.device) if getattr(args, "sae", None) else None


def open_model(args: argparse.Namespace, sae: "SAE | None" = None) -> "LoadedModel":
    """--model, else the model the SAE recorded, else the embedded one."""
    from ..model import EMBEDDED_MODEL, load_model
    from ..sae.recorded import SAERecord

    record = SAERecord.of(sae) if sae is not None else SAERecord()
    return load_model(
        record.model_name(args.model, fallback=EMBEDDED_MODEL), device=args.device, dtype=args.model_dtype
    )


def add_positions_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--positions", default="all", choices=["all", "prompt", "generated"], help="where edits apply (default: all)"
    )


def add_db_arg(p: argparse.ArgumentParser, what: str = "feature database") -> None:
    p.add_argument("--db", help=f"{what} (default: features.db next to the SAE, if any)")


def add_ablate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ablate-direction",
        metavar="FILE[:HOOK]",
        default=None,
        help="project this direction (a vector from `monoscope vector make`) out of the residual stream at every layer "
        "and position while generating: hooked directional ablation, exact for every family incl. Gemma 2/3 and OLMo 2",
    )


def ablation_from_args(args: argparse.Namespace, lm: "LoadedModel") -> tuple[str | None, ContextManager[object]]:
    """(description, context manager applying it) for --ablate-direction, checked against the model."""
    import contextlib

    from .ablation import directional_ablation, load_direction

    if not getattr(args, "ablate_direction", None):
        return None, contextlib.nullcontext()
    label, direction = load_direction(args.ablate_direction, lm.d_model)
    return label, directional_ablation(lm.model, direction)


def feature_db(args: argparse.Namespace, sae: "SAE | None") -> "FeatureDB | None":
    """The feature database: --db, else the one next to the SAE, else None."""
    from .featuredb import FeatureDB, default_db_path

    db = None
    if getattr(args, "db", None):
        db = FeatureDB(args.db)
    elif (
        sae is not None
        and isinstance(folder := getattr(sae, "folder", None), (str, Path))
        and default_db_path(folder).is_file()
    ):
        db = FeatureDB(default_db_path(folder))
    if db is not None and sae is not None:
        db.check_fits(sae)
    return db


def steering_from_args(args: argparse.Namespace, sae: "SAE | None", db: "FeatureDB | None") -> "Steering":
    from .spec import Condition
    from .steering import Steering
    from .vectors import SteeringVector

    steering = Steering(sae, strength=args.strength, positions=args.positions, max_activations=db)
    if args.feature and sae is None:
        raise MonoscopeError("--feature needs --sae (the SAE whose features these are)")
    when = Condition.parse(args.when) if getattr(args, "when", None) else None
    steering.parse(args.feature or [], when=when)
    for spec in getattr(args, "vector", None) or []:
        path, _, coef = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        try:
            coefficient = float(coef) if coef else 1.0
        except ValueError:
            raise MonoscopeError(
                f"cannot read --vector {spec!r}; write FILE.safetensors:COEFFICIENT, e.g. love.safetensors:4"
            ) from None
        steering.add_vector(SteeringVector.load(path), coefficient, label=Path(path).stem)
    return steering


def side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(60, min(shutil.get_terminal_size((120, 24)).columns, 160))
    col = (width - 3) // 2

    def wrap(text: str) -> list[str]:
        out: list[str] = []
        for para in text.splitlines() or [""]:
            out.extend(textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=True) or [""])
        return out

    a, b = (
        [left_title, "-" * min(col, len(left_title))] + wrap(left),
        [right_title, "-" * min(col, len(right_title))] + wrap(right),
    )
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b))
