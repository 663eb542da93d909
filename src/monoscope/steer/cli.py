"""`monoscope steer`, `chat`, `attribute`, `suggest`, `vector make|refusal|export-gguf` and `ablate-direction`.

Argument parsing and printing only; the work lives in the modules beside this one (chat in chat_cli.py,
vectors and directional ablation in vector_cli.py, what they share in cli_shared.py). `register(subparsers)`
adds the commands to the `monoscope` parser.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ..argtypes import positive_float, positive_int
from ..cli_common import Parsers, add_hook_arg, add_json_flag, add_model_args
from ..errors import MonoscopeError
from .cli_shared import (
    SAE_MODEL,
    ablation_from_args,
    add_ablate_arg,
    add_db_arg,
    add_generation_args,
    add_positions_arg,
    feature_db,
    loud_warnings,
    open_model,
    open_sae,
    side_by_side,
    steering_from_args,
)

if TYPE_CHECKING:
    from ..model import LoadedModel
    from ..sae import SAE
    from .featuredb import FeatureDB
    from .toward import Option, SteeringPlan, TowardConfig


# ---------------------------------------------------------------- steer


def cmd_steer(args: argparse.Namespace) -> int:
    from .generation import compare, generate

    loud_warnings()
    if args.reference and args.toward is None:
        raise MonoscopeError("--reference goes with --toward CONCEPT")
    if not args.feature and not args.vector and not args.toward and not args.ablate_direction:
        raise MonoscopeError(
            "nothing to steer with: give --toward CONCEPT, --feature ID=clamp:VALUE (with --sae), "
            "--vector FILE:COEF or --ablate-direction FILE"
        )
    if args.toward is not None and (args.feature or args.vector):
        raise MonoscopeError("--toward chooses the features (or vector) itself; leave out --feature and --vector")
    if args.toward is not None and not args.sae:
        raise MonoscopeError("--toward needs --sae (the SAE whose features steer)")
    if not args.prompt or not args.prompt.strip():
        raise MonoscopeError("the prompt is empty; pass --prompt with some text")
    from .spec import check_number

    check_number(args.strength, "--strength")
    sae = open_sae(args)
    db = feature_db(args, sae)
    plan = None
    if args.toward is not None:
        from .toward import plan_steering

        if not args.toward.strip():
            raise MonoscopeError("--toward is empty; say what to steer toward, e.g. --toward 'the ocean'")
        lm = open_model(args, sae)
        plan = plan_steering(lm, sae, args.toward, references=args.reference or [], db=db, config=_toward_config(args))
        if not plan.works:
            hint = "" if args.method == "vector" else "; try --method vector (a learned steering vector)"
            raise MonoscopeError(
                f"found nothing that steers toward {args.toward!r} ({'; '.join(plan.notes) or 'no option moved the text'}){hint}"
            )
        steering = plan.steering(sae, db)
        steering.strength = args.strength
    else:
        steering = steering_from_args(args, sae, db)
        lm = open_model(args, sae)
    ablated, ablation = ablation_from_args(args, lm)
    steering.compile(lm)  # fail on a bad spec before spending time on the unsteered run
    kw = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw
    )
    if ablated:  # the ablation hooks the whole model, so the two runs cannot share a batch
        unsteered = generate(lm, args.prompt, steering=None, **kw)
        with ablation:
            steered = generate(lm, args.prompt, steering=steering, **kw)
    else:
        unsteered, steered = compare(lm, args.prompt, steering, **kw)
    if args.json:
        labels = db.labels([e.feature for e in steering.feature_edits]) if db is not None else {}
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "unsteered": unsteered.text,
                    "steered": steered.text,
                    "model": lm.name,
                    "sae": args.sae,
                    "features": [
                        {"feature": e.feature, "mode": e.mode, "value": str(e.value), "label": labels.get(e.feature)}
                        for e in steering.feature_edits
                    ],
                    "vectors": [d.describe() for d in steering.direction_edits],
                    "ablated_direction": ablated,
                    "strength": steering.strength,
                    "positions": steering.positions,
                    "seed": args.seed,
                    "max_new_tokens": args.max_new_tokens,
                    "chat_template": not args.raw and bool(getattr(lm.tokenizer, "chat_template", None)),
                    **({"toward": plan.to_dict()} if plan is not None else {}),
                },
                indent=2,
            )
        )
        return 0
    if plan is not None:
        _print_plan(plan, args.sae, str(args.toward))
        print()
    print(f"prompt: {args.prompt}")
    print("steering: " + ("; ".join(steering.describe()) or "none"))
    if ablated:
        print(f"ablated: {ablated} at every layer and position")
    print()
    print(side_by_side("steered", steered.text, "unsteered", unsteered.text))
    return 0


def _add_steer(sub: Parsers) -> None:
    p = sub.add_parser(
        "steer",
        help="generate with SAE features clamped, nudged or ablated, or toward a concept (side by side with unsteered)",
        description="Generate from a prompt with features turned up, down or off, next to the unsteered text. "
        "VALUE is a number in the feature's activation units or a multiple of its max activation like 8x "
        "(from the feature database next to the SAE, else estimated on the starter corpus).",
    )
    p.add_argument("--sae", help="SAE folder (needed for --feature)")
    p.add_argument(
        "--feature",
        action="append",
        metavar="ID=MODE:VALUE",
        help="ID=clamp:VALUE, ID=add:VALUE, ID=multiply:M or ID=ablate (ID=VALUE clamps); repeat for several",
    )
    p.add_argument(
        "--vector",
        action="append",
        metavar="FILE:COEF",
        help="add a steering vector (from `monoscope vector make`) times COEF",
    )
    p.add_argument(
        "--toward",
        metavar="CONCEPT",
        help="steer toward a concept with what `monoscope suggest` chooses (features, or a learned vector)",
    )
    p.add_argument("--reference", action="append", help="with --toward: a short text about the concept (repeatable)")
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "features", "vector"],
        help="with --toward: what may steer (default: auto)",
    )
    p.add_argument("--prompt", required=True, help="the prompt (the chat template is applied when the model has one)")
    p.add_argument("--strength", type=float, default=1.0, help="global strength multiplying every edit (default: 1)")
    add_positions_arg(p)
    p.add_argument(
        "--when",
        metavar="ID>THRESHOLD",
        help="apply the feature edits only where feature ID is above THRESHOLD (e.g. 12>0.5 or 12>0.1x)",
    )
    add_db_arg(p)
    add_ablate_arg(p)
    add_generation_args(p)
    add_model_args(p, None, SAE_MODEL)
    add_json_flag(p, "a JSON object with prompt, unsteered and steered texts")
    p.set_defaults(func=cmd_steer)


# ---------------------------------------------------------------- attribute


def cmd_attribute(args: argparse.Namespace) -> int:
    from .attribution import attribute

    loud_warnings()
    sae = open_sae(args)
    if sae is None:
        raise MonoscopeError("attribute needs --sae DIR: the SAE whose features it attributes to")
    db = feature_db(args, sae)
    lm = open_model(args, sae)
    if args.ablation:
        return _attribute_by_ablation(args, lm, sae, db)
    result = attribute(
        lm, sae, args.prompt, args.target, hook=args.hook, top=args.top, metric=args.metric, raw=not args.chat
    )
    if db is not None:
        labels = db.labels([f.feature for f in result.features])
        for f in result.features:
            f.label = labels.get(f.feature)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    tokens = f"token {result.target_id}" if len(result.target_ids) == 1 else f"{len(result.target_ids)} tokens, summed"
    print(
        f"prompt: {args.prompt!r} -> target {result.target_token!r} ({tokens}): logit {result.logit:.3f}, log-prob {result.logprob:.3f}"
    )
    print(f"features of the SAE at {result.hook}, by |activation x gradient| of the target {args.metric}:")
    print(f"  {'rank':>4} {'feature':>8} {'attribution':>12} {'max act':>9} {'last act':>9}  label")
    for rank, f in enumerate(result.features, 1):
        print(
            f"  {rank:>4} {f.feature:>8} {f.attribution:>+12.4f} {f.activation:>9.3f} {f.last_activation:>9.3f}  {f.label or ''}"
        )
    print(f"  all features: {result.total:+.4f}; reconstruction error: {result.error_attribution:+.4f}")
    if not result.features:
        print("  (no feature is active on this prompt)")
    return 0


def _attribute_by_ablation(args: argparse.Namespace, lm: "LoadedModel", sae: "SAE", db: "FeatureDB | None") -> int:
    from .attribution import map_by_ablation

    result = map_by_ablation(
        lm,
        sae,
        args.prompt,
        args.target,
        hook=args.hook,
        metric=args.metric,
        raw=not args.chat,
        max_features=args.max_features,
    )
    if db is not None:
        labels = db.labels([f.feature for f in result.features])
        for f in result.features:
            f.label = labels.get(f.feature)
    if args.json:
        import math

        out = result.to_dict()
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"prompt: {args.prompt!r} -> target {args.target!r}: {len(result.features)} active features ablated one at a time at {result.hook}"
    )
    print(f"  {'rank':>4} {'feature':>8} {'ablation':>10} {'attribution':>12} {'max act':>9}  label")
    for rank, f in enumerate(result.features[: args.top], 1):
        print(
            f"  {rank:>4} {f.feature:>8} {f.ablation:>+10.4f} {f.attribution:>+12.4f} {f.activation:>9.3f}  {f.label or ''}"
        )
    print(
        f"  agreement: Spearman {result.spearman:.2f} over the active features; {result.top_overlap:.0%} of the 10 largest by "
        "ablation are among the 10 largest by attribution"
    )
    return 0


def _add_attribute(sub: Parsers) -> None:
    p = sub.add_parser(
        "attribute",
        help="which features push the model toward a target token",
        description="Attribute the target's logit after the prompt to the SAE's features (activation x gradient, "
        "with the SAE spliced in and its error kept). Positive: the feature raises the target.",
    )
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("--prompt", required=True, help="text the model reads")
    p.add_argument(
        "--target",
        required=True,
        help="the continuation to explain, e.g. ' Paris'; with several tokens, their logits (or log-probs) are summed",
    )
    p.add_argument("--top", type=positive_int, default=15, help="features to show (default: 15)")
    p.add_argument("--metric", default="logit", choices=["logit", "logprob"], help="what to attribute (default: logit)")
    add_hook_arg(p, default_help="the SAE's own")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt (default: raw text)")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also ablate each active feature (one forward pass each) and rank by the exact effect",
    )
    p.add_argument(
        "--max-features",
        type=positive_int,
        default=256,
        help="with --ablation: active features to ablate, by |attribution| (default: 256)",
    )
    add_db_arg(p, "feature database for labels")
    add_model_args(p, None, "the SAE's model")
    add_json_flag(p, "JSON")
    p.set_defaults(func=cmd_attribute)


# ---------------------------------------------------------------- suggest


def _toward_config(args: argparse.Namespace) -> "TowardConfig":
    from .toward import TowardConfig

    return TowardConfig(method=args.method)


def _suggestion_rows(plan: "SteeringPlan") -> list[dict[str, object]]:
    """`suggest --json`: one entry per candidate feature, best first: the chosen option's features (a single
    feature or a group, `chosen` true, `steer_value` its add value), then the others by measured effect, then
    by log-prob score. A chosen vector is one entry with `feature` null and kind `vector` (learned) or `diffmean`."""
    measured: dict[int, "Option"] = {}
    for option in plan.options:
        if option.kind == "feature" and option.features:
            f = option.features[0][0]
            if f not in measured or (
                option.perplexity_ratio <= plan.max_perplexity_ratio and option.similarity > measured[f].similarity
            ):
                measured[f] = option
    chosen = plan.chosen
    chosen_values = {f: v for f, v in chosen.features} if chosen is not None else {}
    rows = []
    for s in plan.candidates:
        row = s.to_dict()
        option = measured.get(s.feature)
        row.update(
            kind="feature",
            chosen=s.feature in chosen_values,
            steer_value=chosen_values.get(s.feature, option.features[0][1] if option else None),
            positions=plan.positions,
            strength=option.strength if option else None,
            similarity=_num(option.similarity) if option else None,
            mention_rate=_num(option.mention_rate) if option else None,
            perplexity_ratio=_num(option.perplexity_ratio) if option else None,
        )
        rows.append(row)
    rows.sort(key=lambda r: (not r["chosen"], r["similarity"] is None, -(r["similarity"] or 0.0), -r["score"]))
    if chosen is not None and chosen.vector is not None:
        rows.insert(
            0,
            {
                "feature": None,
                "kind": chosen.kind,
                "chosen": True,
                "strength": chosen.strength,
                "positions": plan.positions,
                "similarity": _num(chosen.similarity),
                "mention_rate": _num(chosen.mention_rate),
                "perplexity_ratio": _num(chosen.perplexity_ratio),
                "label": None,
                "source": "diffmean" if chosen.kind == "diffmean" else "learned",
                "explanation": [
                    {"feature": f, "cosine": round(c, 4), "label": plan.labels.get(f)} for f, c in plan.explanation
                ],
            },
        )
    return rows


def _num(x: float | None) -> float | None:
    import math

    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def _print_plan(plan: "SteeringPlan", sae_dir: str, concept: str) -> None:
    chosen = plan.chosen
    print(
        f"unsteered: mean cosine with {concept!r} {plan.unsteered_similarity:.3f}, perplexity {plan.unsteered_perplexity:.2f}"
    )
    if chosen is None:
        print(f"nothing found steers toward {concept!r}.")
    elif chosen.vector is not None:
        name = (
            "a DiffMean vector (concept answers - plain answers)"
            if chosen.kind == "diffmean"
            else "a learned steering vector"
        )
        print(
            f"chosen: {name} at {plan.hook}, strength {chosen.strength:g} (|v| = {chosen.strength:g} x {plan.unit:.3g}), "
            f"{chosen.positions} positions: mean cosine {chosen.similarity:.3f}, perplexity x{chosen.perplexity_ratio:.2f}"
        )
        print("  carried by the SAE features (decoder cosine):")
        for f, c in plan.explanation:
            print(f"    {f:>7}  {c:+.3f}  {plan.labels.get(f) or ''}")
    else:
        what = (
            "one feature"
            if chosen.kind == "feature"
            else f"a group of {len(chosen.features)} features ({'DiffMean' if chosen.kind == 'contrast' else 'learned'} weights)"
        )
        print(
            f"chosen: {what}, added at the {chosen.positions} positions, strength {chosen.strength:g}: mean cosine {chosen.similarity:.3f}, "
            f"mentions {chosen.mention_rate:.0%}, perplexity x{chosen.perplexity_ratio:.2f}"
        )
        for f, v in chosen.features:
            print(f"    {f:>7}  add {v:.4g}  {plan.labels.get(f) or ''}")
    for note in plan.notes:
        print(f"note: {note}")
    print(f"({plan.seconds:.0f} s)")
    if chosen is not None:
        print(
            f"\ntry: monoscope steer --sae {sae_dir} --toward {json.dumps(concept)} --prompt 'Tell me about your day.'"
        )


def cmd_suggest(args: argparse.Namespace) -> int:
    from .toward import plan_steering

    loud_warnings()
    sae = open_sae(args)
    db = feature_db(args, sae)
    lm = open_model(args, sae)
    plan = plan_steering(lm, sae, args.description, references=args.reference or [], db=db, config=_toward_config(args))
    rows = _suggestion_rows(plan)
    if args.json:
        print(json.dumps(rows[: max(args.top, 1 if plan.chosen is None else len(plan.chosen.features) or 1)], indent=2))
        return 0
    if not plan.candidates:
        print(
            f"no candidate features for {args.description!r}: nothing in the feature database or the references points to one; "
            "the learned steering vector may still work: monoscope suggest --method vector ..."
        )
    else:
        print(
            f"features that move {lm.name} toward {args.description!r}, tried by generation (mean MiniLM cosine of the completions with it, "
            "perplexity / unsteered) ranked first by their share of a learned group (score):"
        )
        print(f"  {'feature':>7}  {'cosine':>6}  {'ppl x':>5}  {'score':>7}  source      label")
        for r in rows[: args.top]:
            if r["kind"] != "feature":
                continue
            sim = f"{r['similarity']:.3f}" if r["similarity"] is not None else "   -  "
            ratio = f"{r['perplexity_ratio']:.2f}" if r["perplexity_ratio"] is not None else "  -  "
            print(
                f"  {r['feature']:>7}  {sim:>6}  {ratio:>5}  {r['score']:+.4f}  {r['source']:<10}  {r['label'] or ''}"
                + ("  <- chosen" if r["chosen"] else "")
            )
        print()
    _print_plan(plan, args.sae, args.description)
    return 0


def _add_suggest(sub: Parsers) -> None:
    p = sub.add_parser(
        "suggest",
        help="find what steers the model toward a concept ('the ocean', 'talk like a pirate')",
        description="Find how to steer toward a concept: candidate features from the feature database (search) and from "
        "what fires on the references and on the model's own text about the concept, ranked by their share of a learned feature group "
        "that makes that text likely, then tried by generation (a few short continuations each, judged by their MiniLM cosine with the concept "
        "at a bounded perplexity), alone and as a learned group; with --method vector (or when no feature works, under auto) a "
        "learned steering vector, explained by the SAE features it points along.",
    )
    p.add_argument("description", help="what to steer toward, e.g. 'the ocean'")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument(
        "--reference",
        action="append",
        help="a short text that matches the description (repeatable; the description itself is always one)",
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "features", "vector"],
        help="features, a learned vector, or auto: features, and a learned vector when none moves the text (default: auto)",
    )
    p.add_argument("--top", type=positive_int, default=10, help="features to show (default: 10)")
    p.add_argument(
        "--scale",
        type=positive_float,
        default=2.0,
        help="accepted for compatibility: candidates are now ranked by a learned group and by generation, not by a log-prob gain at a fixed add value",
    )
    add_db_arg(p)
    add_model_args(p, None, "the SAE's model")
    add_json_flag(p, "JSON")
    p.set_defaults(func=cmd_suggest)


def register(subparsers: Parsers) -> None:
    """Add the intervention commands to the `monoscope` command line."""
    from .chat_cli import add_chat
    from .vector_cli import add_ablate_direction, add_vector

    for add in (_add_steer, add_chat, _add_attribute, _add_suggest, add_vector, add_ablate_direction):
        add(subparsers)
