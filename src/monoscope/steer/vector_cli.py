"""`monoscope vector make|refusal|export-gguf` (steering vectors) and `monoscope ablate-direction`."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from ..argtypes import fraction, positive_float, positive_int
from ..cli_common import (
    Parsers,
    add_hook_arg,
    add_json_flag,
    add_model_args,
    default_hooks,
)
from ..errors import MonoscopeError
from .cli_shared import loud_warnings, side_by_side

# ---------------------------------------------------------------- vectors


def cmd_vector_make(args: argparse.Namespace) -> int:
    from .vectors import contrastive_vector, load_prompts

    positive = load_prompts(args.positive, args.positive_file)
    negative = load_prompts(args.negative, args.negative_file)
    if not positive or not negative:
        which = "positive" if not positive else "negative"
        raise MonoscopeError(
            f"the {which} prompt set is empty; give --{which} TEXT or --{which}-file FILE (one prompt per line)"
        )
    from ..model import EMBEDDED_MODEL, load_model

    lm = load_model(args.model or EMBEDDED_MODEL, device=args.device, dtype=args.model_dtype)
    hooks = default_hooks(args.hook, lm)
    vector = contrastive_vector(
        lm,
        positive,
        negative,
        hooks,
        position=args.position,
        chat_template=args.chat_template,
        name=Path(args.out).stem,
    )
    tensors, meta = vector.save(args.out)
    print(f"wrote {tensors} and {meta}")
    for hook, v in vector.directions.items():
        print(
            f"  {hook}: |v| = {v.norm():.4g} ({len(positive)} positive, {len(negative)} negative prompts, {args.position} token)"
        )
    print(
        f"next: monoscope steer --vector {tensors}:4 --prompt '...'   or   monoscope vector export-gguf {tensors} --out {Path(tensors).with_suffix('.gguf')}"
    )
    return 0


def cmd_vector_export(args: argparse.Namespace) -> int:
    from .vectors import SteeringVector, export_gguf, gguf_layer

    vector = SteeringVector.load(args.vector)
    path = export_gguf(vector, args.out, model_hint=args.model_hint, coefficient=args.coefficient)
    layers = ", ".join(f"{h} -> direction.{gguf_layer(h)}" for h in vector.hooks)
    print(
        f"wrote {path} ({layers}); use it with: llama-cli -m MODEL.gguf --control-vector {path}  (or --control-vector-scaled {path}:SCALE)"
    )
    return 0


def _layer_range(text: str) -> list[int]:
    """`12`, `4-20` or `3,5,9` -> layer numbers."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 12, 4-20 or 3,5,9; got {text!r}") from None
    if not out or any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected non-negative layer numbers, got {text!r}")
    return out


def cmd_vector_refusal(args: argparse.Namespace) -> int:
    from .refusal import REFUSAL_OPENINGS, builtin_prompts, find_refusal_direction
    from .vectors import load_prompts

    harmful = load_prompts(args.harmful, args.harmful_file)
    harmless = load_prompts(args.harmless, args.harmless_file)
    if not harmful and not harmless:
        harmful, harmless = builtin_prompts()
    elif not harmful or not harmless:
        which = "harmful" if not harmful else "harmless"
        raise MonoscopeError(
            f"the {which} prompt set is empty; give --{which} TEXT or --{which}-file FILE (or neither set, for the built-in ones)"
        )
    from ..model import EMBEDDED_MODEL, load_model

    lm = load_model(args.model or EMBEDDED_MODEL, device=args.device, dtype=args.model_dtype)
    search = find_refusal_direction(
        lm,
        harmful,
        harmless,
        layers=args.layers,
        positions=args.positions,
        openings=args.refusal_opening or REFUSAL_OPENINGS,
        val_fraction=args.val_fraction,
        max_layer_fraction=args.max_layer_fraction,
        kl_max=args.kl_max,
        seed=args.seed,
        progress=not args.json,
        name=Path(args.out).stem,
    )
    tensors, meta = search.vector.save(args.out)
    if args.json:
        print(json.dumps({"out": str(tensors), **search.to_dict()}, indent=2, allow_nan=False, default=lambda v: None))
        return 0
    c = search.chosen
    print(
        f"scored {len(search.candidates)} candidates ({len(set(x.layer for x in search.candidates))} layers x "
        f"{len(set(x.position for x in search.candidates))} positions) on {search.n_val} held-out prompts"
    )
    print(
        f"refusal log-odds ({', '.join(repr(t) for t in search.refusal_tokens[:6])}{', ...' if len(search.refusal_tokens) > 6 else ''}): "
        f"harmful {search.baseline_harmful:+.2f}, harmless {search.baseline_harmless:+.2f}"
    )
    induce = "not measured" if c.induce is None else f"{c.induce:+.2f}"
    kl = "not measured" if c.kl is None else f"{c.kl:.3f}"
    print(
        f"chosen: resid_pre.{c.layer}, position {c.position}: ablated on harmful {c.bypass:+.2f} "
        f"(drop {search.baseline_harmful - c.bypass:.2f}), added on harmless {induce}, KL on harmless {kl}"
    )
    if not search.passed_filters:
        print(
            "note: no candidate passed the filters (layer, KL, induces refusal); this is the lowest bypass among those with a "
            "small KL (or the smallest KL). A model that seldom refuses has no clear refusal direction."
        )
    best = sorted((x for x in search.candidates if x.passed), key=lambda x: x.bypass)[:5]
    if not best:
        best = sorted(search.candidates, key=lambda x: x.kl)[:5]
    if best:
        print(
            f"{'best passing candidates:' if search.passed_filters else 'gentlest candidates:':<26}layer  pos   bypass  induce     kl"
        )
        for x in best:
            induce_x = "      -" if x.induce is None else f"{x.induce:+7.2f}"
            print(f"{'':>26}{x.layer:5d}  {x.position:3d}  {x.bypass:+7.2f} {induce_x}  {x.kl:.3f}")
    print(f"wrote {tensors} and {meta}")
    print(f"next: monoscope ablate-direction --vector {tensors} --prompt '...'")
    return 0


def add_vector(sub: Parsers) -> None:
    p = sub.add_parser(
        "vector",
        help="steering vectors: make a contrastive one, export it for llama.cpp",
        description="Steering vectors (difference of mean activations between two prompt sets).",
    )
    vsub = p.add_subparsers(dest="vector_command", metavar="ACTION")
    vsub.required = True
    m = vsub.add_parser(
        "make",
        help="difference of mean activations between positive and negative prompts",
        description="mean(positive) - mean(negative) activations at the hook point(s), at each prompt's last token "
        "or averaged over its tokens; saved as NAME.safetensors + NAME.json.",
    )
    m.add_argument("--positive", action="append", help="a positive prompt (repeatable)")
    m.add_argument("--negative", action="append", help="a negative prompt (repeatable)")
    m.add_argument("--positive-file", action="append", help="file of positive prompts, one per line")
    m.add_argument("--negative-file", action="append", help="file of negative prompts, one per line")
    add_hook_arg(m, repeat=True, default_help="the middle resid_post")
    m.add_argument(
        "--position",
        default="last",
        choices=["last", "mean"],
        help="last token of each prompt, or the mean over its tokens (default: last)",
    )
    m.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template as a user turn")
    m.add_argument("--out", required=True, help="output NAME.safetensors (NAME.json is written beside it)")
    add_model_args(m, None, "smollm2-135m-instruct")
    m.set_defaults(func=cmd_vector_make)
    r = vsub.add_parser(
        "refusal",
        help="find a refusal direction: score every layer and position (Arditi et al.)",
        description="Candidate directions mean(harmful) - mean(harmless) at resid_pre.L for each layer L and each of "
        "the last --positions prompt tokens, made on half of the prompts and scored on the other half: the "
        "drop of the refusal log-odds on harmful prompts when the direction is ablated, the rise on "
        "harmless prompts when it is added, and the KL on harmless prompts when it is ablated. The lowest "
        "ablated score among candidates below --max-layer-fraction of the depth, with KL <= --kl-max and "
        "a rise when added, is kept. Without prompt sets, small built-in ones are used.",
    )
    r.add_argument("--harmful", action="append", help="a prompt the model should refuse (repeatable)")
    r.add_argument("--harmless", action="append", help="an ordinary prompt (repeatable)")
    r.add_argument("--harmful-file", action="append", help="file of harmful prompts, one per line")
    r.add_argument("--harmless-file", action="append", help="file of harmless prompts, one per line")
    r.add_argument("--layers", type=_layer_range, default=None, help="layers to try, e.g. 4-20 (default: all)")
    r.add_argument("--positions", type=positive_int, default=5, help="last prompt tokens to try (default: 5)")
    r.add_argument(
        "--refusal-opening",
        action="append",
        default=None,
        help="a word a refusal starts with (repeatable; default: I, Sorry, As, ...)",
    )
    r.add_argument(
        "--val-fraction", type=fraction, default=0.5, help="share of the prompts kept for scoring (default: 0.5)"
    )
    r.add_argument(
        "--max-layer-fraction",
        type=fraction,
        default=0.8,
        help="keep candidates below this fraction of the depth (default: 0.8)",
    )
    r.add_argument(
        "--kl-max", type=positive_float, default=0.1, help="largest KL on harmless prompts when ablated (default: 0.1)"
    )
    r.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    r.add_argument(
        "--out", required=True, help="output NAME.safetensors (NAME.json is written beside it, with the scores)"
    )
    add_json_flag(r, "every candidate's scores as JSON")
    add_model_args(r, None, "smollm2-135m-instruct")
    r.set_defaults(func=cmd_vector_refusal)
    e = vsub.add_parser(
        "export-gguf",
        help="write a vector as a llama.cpp control vector (GGUF)",
        description="llama.cpp adds direction.N to the output of block N: a vector at resid_post.N becomes direction.N (N >= 1).",
    )
    e.add_argument("vector", help="NAME.safetensors from `monoscope vector make`")
    e.add_argument("--out", required=True, help="output .gguf file")
    e.add_argument("--coefficient", type=float, default=1.0, help="scale the vector by this (default: 1)")
    e.add_argument(
        "--model-hint",
        default=None,
        help="controlvector.model_hint (default: the model type recorded with the vector, e.g. llama)",
    )
    e.set_defaults(func=cmd_vector_export)


# ---------------------------------------------------------------- ablate-direction


def cmd_ablate_direction(args: argparse.Namespace) -> int:
    from .ablation import check_bakeable, directional_ablation, save_orthogonalized
    from .generation import generate
    from .vectors import SteeringVector

    loud_warnings()
    if not args.out and not args.prompt:
        raise MonoscopeError(
            "nothing to do: give --out DIR to write the ablated model, and/or --prompt to compare generations"
        )
    vector = SteeringVector.load(args.vector)
    hook, direction = vector.direction(args.hook)
    from ..model import EMBEDDED_MODEL, load_model

    lm = load_model(args.model or vector.model or EMBEDDED_MODEL, device=args.device, dtype=args.model_dtype)
    if vector.model and lm.name != vector.model:
        from ..sae.interop import same_model

        if not same_model(vector.model, lm.name):
            warnings.warn(f"the vector was made on {vector.model!r} but the model is {lm.name!r}", stacklevel=2)
    if args.out:
        check_bakeable(lm.model)  # before the preview: a post-norm family cannot take --out
    if args.prompt:
        before = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens, raw=args.raw)
        with directional_ablation(lm.model, direction):
            after = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens, raw=args.raw)
        print(f"direction from {hook} of {args.vector}, ablated at every layer and position")
        print(side_by_side("ablated", after.text, "original", before.text))
    if args.out:
        out = save_orthogonalized(lm, direction, args.out, note={"vector": str(args.vector), "hook": hook})
        print(
            f"wrote {out}: {lm.name} with the direction orthogonalised out of its weights (loads in plain transformers: --model {out})"
        )
    return 0


def add_ablate_direction(sub: Parsers) -> None:
    p = sub.add_parser(
        "ablate-direction",
        help="remove a direction everywhere (e.g. refusal); write it into the weights",
        description="Directional ablation: x -> x - (x.r)r at every layer and position, previewed with --prompt, and baked into a "
        "new transformers checkpoint with --out (embedding, attention and MLP output weights orthogonalised to r). Post-norm "
        "families (Gemma 2/3, OLMo 2) cannot be baked exactly: apply it at run time with `steer`/`chat`/`serve --ablate-direction FILE`.",
    )
    p.add_argument(
        "--vector",
        required=True,
        help="NAME.safetensors from `monoscope vector make` (e.g. harmful vs harmless prompts)",
    )
    p.add_argument(
        "--hook",
        default=None,
        help="which of the vector's hook points to take the direction from (default: its only one)",
    )
    p.add_argument(
        "--out", default=None, help="write the orthogonalised model to this new folder (not for post-norm families)"
    )
    p.add_argument("--prompt", default=None, help="compare generations with and without the ablation")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=40, help="tokens to generate for --prompt (default: 40)"
    )
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    add_model_args(p, None, "the vector's model, else smollm2-135m-instruct")
    p.set_defaults(func=cmd_ablate_direction)
