"""`monoscope steer`, `chat`, `attribute`, `suggest`, `vector make|export-gguf` and `ablate-direction`.

Argument parsing and printing only; the work lives in the modules beside this one. `register(subparsers)`
adds the commands to the `monoscope` parser.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

from ..argtypes import fraction, positive_float, positive_int
from ..errors import MonoscopeError


def _loud_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"monoscope: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show  # type: ignore[assignment]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, local folder, .gguf file or smollm2-135m-instruct (default: the SAE's model, else the embedded one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--model-dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, float16, bfloat16")


def _add_generation_args(p: argparse.ArgumentParser, default_tokens: int = 40) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=default_tokens, help=f"tokens to generate (default: {default_tokens})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (alone it samples at temperature 1; default: greedy)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template to the prompt")


def _open_sae(args: argparse.Namespace):
    from .steering import load_steering_sae

    return load_steering_sae(args.sae, device=args.device) if getattr(args, "sae", None) else None


def _open_model(args: argparse.Namespace, sae=None):
    from ..model import EMBEDDED_MODEL, load_model
    from ..sae.io import sae_model_name

    name = args.model or (sae_model_name(sae) if sae is not None else None) or EMBEDDED_MODEL
    if args.model is None and sae is not None and sae_model_name(sae) and not Path(name).exists() and name.startswith((".", "/", "~")):
        raise MonoscopeError(f"the SAE was trained on {name}, which is not here; pass --model")
    return load_model(name, device=args.device, dtype=args.model_dtype)


def _add_ablate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablate-direction", metavar="FILE[:HOOK]", default=None,
                   help="project this direction (a vector from `monoscope vector make`) out of the residual stream at every layer "
                   "and position while generating: hooked directional ablation, exact for every family incl. Gemma 2/3 and OLMo 2")


def _ablation(args: argparse.Namespace, lm) -> tuple[str | None, Any]:
    """(description, context manager applying it) for --ablate-direction, checked against the model."""
    import contextlib

    from .ablation import directional_ablation, load_direction

    if not getattr(args, "ablate_direction", None):
        return None, contextlib.nullcontext()
    label, direction = load_direction(args.ablate_direction, lm.d_model)
    return label, directional_ablation(lm.model, direction)


def _db(args: argparse.Namespace, sae) -> Any:
    """The feature database: --db, else the one next to the SAE, else None."""
    from .featuredb import FeatureDB, default_db_path

    db = None
    if getattr(args, "db", None):
        db = FeatureDB(args.db)
    elif sae is not None and getattr(sae, "folder", None) is not None and default_db_path(sae.folder).is_file():
        db = FeatureDB(default_db_path(sae.folder))
    if db is not None and sae is not None:
        db.check_fits(sae)
    return db


def _steering_from_args(args: argparse.Namespace, sae, db):
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
            raise MonoscopeError(f"cannot read --vector {spec!r}; write FILE.safetensors:COEFFICIENT, e.g. love.safetensors:4") from None
        steering.add_vector(SteeringVector.load(path), coefficient, label=Path(path).stem)
    return steering


def _side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(60, min(shutil.get_terminal_size((120, 24)).columns, 160))
    col = (width - 3) // 2

    def wrap(text: str) -> list[str]:
        out: list[str] = []
        for para in text.splitlines() or [""]:
            out.extend(textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=True) or [""])
        return out

    a, b = [left_title, "-" * min(col, len(left_title))] + wrap(left), [right_title, "-" * min(col, len(right_title))] + wrap(right)
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b))


# ---------------------------------------------------------------- steer


def cmd_steer(args: argparse.Namespace) -> int:
    from .generation import compare, generate

    _loud_warnings()
    if args.reference and args.toward is None:
        raise MonoscopeError("--reference goes with --toward CONCEPT")
    if not args.feature and not args.vector and not args.toward and not args.ablate_direction:
        raise MonoscopeError("nothing to steer with: give --toward CONCEPT, --feature ID=clamp:VALUE (with --sae), "
                             "--vector FILE:COEF or --ablate-direction FILE")
    if args.toward is not None and (args.feature or args.vector):
        raise MonoscopeError("--toward chooses the features (or vector) itself; leave out --feature and --vector")
    if args.toward is not None and not args.sae:
        raise MonoscopeError("--toward needs --sae (the SAE whose features steer)")
    if not args.prompt or not args.prompt.strip():
        raise MonoscopeError("the prompt is empty; pass --prompt with some text")
    from .spec import check_number

    check_number(args.strength, "--strength")
    sae = _open_sae(args)
    db = _db(args, sae)
    plan = None
    if args.toward is not None:
        from .toward import plan_steering

        if not args.toward.strip():
            raise MonoscopeError("--toward is empty; say what to steer toward, e.g. --toward 'the ocean'")
        lm = _open_model(args, sae)
        plan = plan_steering(lm, sae, args.toward, references=args.reference or [], db=db, config=_toward_config(args))
        if not plan.works:
            hint = "" if args.method == "vector" else "; try --method vector (a learned steering vector)"
            raise MonoscopeError(f"found nothing that steers toward {args.toward!r} ({'; '.join(plan.notes) or 'no option moved the text'}){hint}")
        steering = plan.steering(sae, db)
        steering.strength = args.strength
    else:
        steering = _steering_from_args(args, sae, db)
        lm = _open_model(args, sae)
    ablated, ablation = _ablation(args, lm)
    steering.compile(lm)  # fail on a bad spec before spending time on the unsteered run
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw)
    if ablated:  # the ablation hooks the whole model, so the two runs cannot share a batch
        unsteered = generate(lm, args.prompt, steering=None, **kw)
        with ablation:
            steered = generate(lm, args.prompt, steering=steering, **kw)
    else:
        unsteered, steered = compare(lm, args.prompt, steering, **kw)
    if args.json:
        labels = db.labels([e.feature for e in steering.feature_edits]) if db is not None else {}
        print(json.dumps({
            "prompt": args.prompt,
            "unsteered": unsteered.text,
            "steered": steered.text,
            "model": lm.name,
            "sae": args.sae,
            "features": [{"feature": e.feature, "mode": e.mode, "value": str(e.value), "label": labels.get(e.feature)} for e in steering.feature_edits],
            "vectors": [d.describe() for d in steering.direction_edits],
            "ablated_direction": ablated,
            "strength": steering.strength,
            "positions": steering.positions,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "chat_template": not args.raw and bool(getattr(lm.tokenizer, "chat_template", None)),
            **({"toward": plan.to_dict()} if plan is not None else {}),
        }, indent=2))
        return 0
    if plan is not None:
        _print_plan(plan, args.sae, args.toward)
        print()
    print(f"prompt: {args.prompt}")
    print("steering: " + ("; ".join(steering.describe()) or "none"))
    if ablated:
        print(f"ablated: {ablated} at every layer and position")
    print()
    print(_side_by_side("steered", steered.text, "unsteered", unsteered.text))
    return 0


def _add_steer(sub) -> None:
    p = sub.add_parser("steer", help="generate with SAE features clamped, nudged or ablated, or toward a concept (side by side with unsteered)",
                       description="Generate from a prompt with features turned up, down or off, next to the unsteered text. "
                       "VALUE is a number in the feature's activation units or a multiple of its max activation like 8x "
                       "(from the feature database next to the SAE, else estimated on the starter corpus).")
    p.add_argument("--sae", help="SAE folder (needed for --feature)")
    p.add_argument("--feature", action="append", metavar="ID=MODE:VALUE",
                   help="ID=clamp:VALUE, ID=add:VALUE, ID=multiply:M or ID=ablate (ID=VALUE clamps); repeat for several")
    p.add_argument("--vector", action="append", metavar="FILE:COEF", help="add a steering vector (from `monoscope vector make`) times COEF")
    p.add_argument("--toward", metavar="CONCEPT", help="steer toward a concept with what `monoscope suggest` chooses (features, or a learned vector)")
    p.add_argument("--reference", action="append", help="with --toward: a short text about the concept (repeatable)")
    p.add_argument("--method", default="auto", choices=["auto", "features", "vector"], help="with --toward: what may steer (default: auto)")
    p.add_argument("--prompt", required=True, help="the prompt (the chat template is applied when the model has one)")
    p.add_argument("--strength", type=float, default=1.0, help="global strength multiplying every edit (default: 1)")
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"], help="where edits apply (default: all)")
    p.add_argument("--when", metavar="ID>THRESHOLD", help="apply the feature edits only where feature ID is above THRESHOLD (e.g. 12>0.5 or 12>0.1x)")
    p.add_argument("--db", help="feature database (default: features.db next to the SAE, if any)")
    _add_ablate_arg(p)
    _add_generation_args(p)
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON object with prompt, unsteered and steered texts")
    p.set_defaults(func=cmd_steer)


# ---------------------------------------------------------------- chat

CHAT_HELP = """commands (between turns):
  /set ID VALUE      clamp feature ID to VALUE (a number or a multiple of its max, e.g. 8x)
  /set ID MODE:VALUE with MODE add, clamp or multiply (e.g. /set 12 add:4); /set ID ablate
  /off ID            remove feature ID from the equalizer
  /list              show the equalizer
  /strength S        scale every edit by S (e.g. 0.5)
  /reset             remove every edit, strength back to 1
  /clear             forget the conversation so far
  /quit              leave (or Ctrl-D)"""


class ChatSession:
    """The state of `monoscope chat`: conversation, equalizer, and the command interpreter."""

    def __init__(self, lm, sae, db, args: argparse.Namespace, out=sys.stdout):
        from .steering import Steering

        self.lm, self.sae, self.db, self.args, self.out = lm, sae, db, args, out
        self.steering = Steering(sae, max_activations=db, positions=args.positions)
        self.history: list[dict] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        from .spec import parse_feature_spec

        parts = line.strip().split()
        name, rest = parts[0].lower(), parts[1:]
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(CHAT_HELP)
        elif name == "/set":
            if self.sae is None:
                raise MonoscopeError("/set needs an SAE: start chat with --sae DIR")
            if len(rest) != 2:
                raise MonoscopeError("usage: /set ID VALUE (e.g. /set 1234 8x or /set 1234 add:4)")
            feature, mode, value = parse_feature_spec(f"{rest[0]}={rest[1]}")
            trial = self.steering.copy().set(feature, mode, value)
            trial.compile(self.lm)  # check the id and resolve the value now, not at the next turn
            self.steering = trial
            self.say(f"set {trial.feature_edits[-1].describe()}")
        elif name == "/off":
            if len(rest) != 1:
                raise MonoscopeError("usage: /off ID")
            from .spec import check_feature_id

            feature = check_feature_id(rest[0])
            self.say(f"removed {feature}" if self.steering.remove(feature) else f"feature {feature} was not set")
        elif name == "/list":
            lines = self.steering.describe()
            labels = self.db.labels([e.feature for e in self.steering.feature_edits]) if self.db is not None else {}
            if not lines:
                self.say("equalizer: flat (no edits)")
            for e in self.steering.feature_edits:
                self.say(f"  {e.describe()}" + (f"  ({labels[e.feature]})" if e.feature in labels else ""))
            for d in self.steering.direction_edits:
                self.say(f"  {d.describe()}")
            self.say(f"  strength {self.steering.strength:g}")
        elif name == "/strength":
            if len(rest) != 1:
                raise MonoscopeError("usage: /strength S (e.g. /strength 0.5)")
            from .spec import check_number

            self.steering.strength = check_number(rest[0], "strength")
            self.say(f"strength {self.steering.strength:g}")
        elif name == "/reset":
            self.steering.reset()
            self.say("equalizer reset: no edits, strength 1")
        elif name == "/clear":
            self.history.clear()
            self.say("conversation cleared")
        else:
            self.say(f"unknown command {name}\n{CHAT_HELP}")
        return True

    def _prompt_ids(self):
        import torch

        from .generation import encode_prompt

        limit = getattr(self.lm.config, "max_position_embeddings", None) or 4096
        while True:
            ids = encode_prompt(self.lm.tokenizer, self.history, raw=self.args.raw, device=self.lm.device)
            if ids.shape[-1] + self.args.max_new_tokens <= limit or len(self.history) <= 1:
                break
            self.history = self.history[2:] if len(self.history) > 2 else self.history[-1:]
        if ids.shape[-1] + self.args.max_new_tokens > limit:
            keep = max(1, limit - self.args.max_new_tokens)
            ids = ids[:, -keep:]
        return ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)

    def reply(self, text: str) -> str:
        import torch
        from transformers import TextIteratorStreamer

        from .generation import generation_kwargs
        from .steering import steer

        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        kw = generation_kwargs(self.lm.tokenizer, self.args.max_new_tokens, self.args.temperature, self.args.top_p, self.args.seed)
        streamer = TextIteratorStreamer(self.lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.lm.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kw)
            except BaseException as err:  # surfaced in the main thread
                errors.append(err)
                streamer.end()

        with steer(self.lm, self.steering) as handle:
            handle.begin(ids.shape[-1])
            if self.args.seed is not None:
                torch.manual_seed(self.args.seed)
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            pieces = []
            self.out.write("model> ")
            for piece in streamer:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
            worker.join()
        self.out.write("\n")
        self.out.flush()
        if errors:
            raise errors[0]
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def cmd_chat(args: argparse.Namespace) -> int:
    _loud_warnings()
    sae = _open_sae(args)
    db = _db(args, sae)
    lm = _open_model(args, sae)
    ablated, ablation = _ablation(args, lm)
    with ablation:
        return _chat_loop(ChatSession(lm, sae, db, args), args, lm, ablated)


def _chat_loop(session: "ChatSession", args: argparse.Namespace, lm, ablated: str | None) -> int:
    for spec in args.feature or []:
        session.command(f"/set {spec.replace('=', ' ', 1)}")
    interactive = sys.stdin.isatty()
    session.say(f"monoscope chat with {lm.name}" + (f" (SAE {args.sae})" if args.sae else "") + (f", {ablated} ablated" if ablated else "")
                + "; /help for commands, /quit to leave")
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if not interactive:
            session.say(f"you> {line}")
        try:
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            session.reply(line)
        except MonoscopeError as err:
            session.say(f"error: {err}")
    session.say("bye")
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal with a steerable model (/set, /off, /list, /strength, /reset)",
                       description="A terminal chat with the model (the embedded SmolLM2-135M-Instruct by default). Between turns, "
                       "/set ID VALUE clamps a feature (or /set ID add:4), /off ID removes it, /list shows the equalizer, "
                       "/strength S scales it, /reset flattens it, /quit leaves.")
    p.add_argument("--sae", help="SAE folder whose features /set refers to")
    p.add_argument("--feature", action="append", metavar="ID=MODE:VALUE", help="start with this edit (repeatable)")
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"], help="where edits apply (default: all)")
    p.add_argument("--db", help="feature database (default: features.db next to the SAE, if any)")
    _add_ablate_arg(p)
    _add_generation_args(p, default_tokens=60)
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)


# ---------------------------------------------------------------- attribute


def cmd_attribute(args: argparse.Namespace) -> int:
    from .attribution import attribute

    _loud_warnings()
    sae = _open_sae(args)
    db = _db(args, sae)
    lm = _open_model(args, sae)
    if args.ablation:
        return _attribute_by_ablation(args, lm, sae, db)
    result = attribute(lm, sae, args.prompt, args.target, hook=args.hook, top=args.top, metric=args.metric, raw=not args.chat)
    if db is not None:
        labels = db.labels([f.feature for f in result.features])
        for f in result.features:
            f.label = labels.get(f.feature)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    tokens = f"token {result.target_id}" if len(result.target_ids) == 1 else f"{len(result.target_ids)} tokens, summed"
    print(f"prompt: {args.prompt!r} -> target {result.target_token!r} ({tokens}): logit {result.logit:.3f}, log-prob {result.logprob:.3f}")
    print(f"features of the SAE at {result.hook}, by |activation x gradient| of the target {args.metric}:")
    print(f"  {'rank':>4} {'feature':>8} {'attribution':>12} {'max act':>9} {'last act':>9}  label")
    for rank, f in enumerate(result.features, 1):
        print(f"  {rank:>4} {f.feature:>8} {f.attribution:>+12.4f} {f.activation:>9.3f} {f.last_activation:>9.3f}  {f.label or ''}")
    print(f"  all features: {result.total:+.4f}; reconstruction error: {result.error_attribution:+.4f}")
    if not result.features:
        print("  (no feature is active on this prompt)")
    return 0


def _attribute_by_ablation(args: argparse.Namespace, lm, sae, db) -> int:
    from .attribution import map_by_ablation

    result = map_by_ablation(lm, sae, args.prompt, args.target, hook=args.hook, metric=args.metric, raw=not args.chat,
                             max_features=args.max_features)
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
    print(f"prompt: {args.prompt!r} -> target {args.target!r}: {len(result.features)} active features ablated one at a time at {result.hook}")
    print(f"  {'rank':>4} {'feature':>8} {'ablation':>10} {'attribution':>12} {'max act':>9}  label")
    for rank, f in enumerate(result.features[: args.top], 1):
        print(f"  {rank:>4} {f.feature:>8} {f.ablation:>+10.4f} {f.attribution:>+12.4f} {f.activation:>9.3f}  {f.label or ''}")
    print(f"  agreement: Spearman {result.spearman:.2f} over the active features; {result.top_overlap:.0%} of the 10 largest by "
          "ablation are among the 10 largest by attribution")
    return 0


def _add_attribute(sub) -> None:
    p = sub.add_parser("attribute", help="which features push the model toward a target token", description="Attribute the target's logit after the prompt to the SAE's features (activation x gradient, with the SAE spliced in and its error kept). Positive: the feature raises the target.")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("--prompt", required=True, help="text the model reads")
    p.add_argument("--target", required=True, help="the continuation to explain, e.g. ' Paris'; with several tokens, their logits (or log-probs) are summed")
    p.add_argument("--top", type=positive_int, default=15, help="features to show (default: 15)")
    p.add_argument("--metric", default="logit", choices=["logit", "logprob"], help="what to attribute (default: logit)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's own)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt (default: raw text)")
    p.add_argument("--ablation", action="store_true", help="also ablate each active feature (one forward pass each) and rank by the exact effect")
    p.add_argument("--max-features", type=positive_int, default=256, help="with --ablation: active features to ablate, by |attribution| (default: 256)")
    p.add_argument("--db", help="feature database for labels (default: features.db next to the SAE, if any)")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_attribute)


# ---------------------------------------------------------------- suggest


def _toward_config(args: argparse.Namespace):
    from .toward import TowardConfig

    return TowardConfig(method=args.method)


def _suggestion_rows(plan) -> list[dict]:
    """`suggest --json`: one entry per candidate feature, best first: the chosen option's features (a single
    feature or a group, `chosen` true, `steer_value` its add value), then the others by measured effect, then
    by log-prob score. A chosen vector is one entry with `feature` null and kind `vector` (learned) or `diffmean`."""
    measured: dict[int, Any] = {}
    for option in plan.options:
        if option.kind == "feature" and option.features:
            f = option.features[0][0]
            if f not in measured or (option.perplexity_ratio <= plan.max_perplexity_ratio and option.similarity > measured[f].similarity):
                measured[f] = option
    chosen = plan.chosen
    chosen_values = {f: v for f, v in chosen.features} if chosen is not None else {}
    rows = []
    for s in plan.candidates:
        row = s.to_dict()
        option = measured.get(s.feature)
        row.update(kind="feature", chosen=s.feature in chosen_values, steer_value=chosen_values.get(s.feature, option.features[0][1] if option else None),
                   positions=plan.positions, strength=option.strength if option else None,
                   similarity=_num(option.similarity) if option else None, mention_rate=_num(option.mention_rate) if option else None,
                   perplexity_ratio=_num(option.perplexity_ratio) if option else None)
        rows.append(row)
    rows.sort(key=lambda r: (not r["chosen"], r["similarity"] is None, -(r["similarity"] or 0.0), -r["score"]))
    if chosen is not None and chosen.vector is not None:
        rows.insert(0, {"feature": None, "kind": chosen.kind, "chosen": True, "strength": chosen.strength, "positions": plan.positions,
                        "similarity": _num(chosen.similarity), "mention_rate": _num(chosen.mention_rate),
                        "perplexity_ratio": _num(chosen.perplexity_ratio), "label": None,
                        "source": "diffmean" if chosen.kind == "diffmean" else "learned",
                        "explanation": [{"feature": f, "cosine": round(c, 4), "label": plan.labels.get(f)} for f, c in plan.explanation]})
    return rows


def _num(x: float | None) -> float | None:
    import math

    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def _print_plan(plan, sae_dir: str, concept: str) -> None:
    chosen = plan.chosen
    print(f"unsteered: mean cosine with {concept!r} {plan.unsteered_similarity:.3f}, perplexity {plan.unsteered_perplexity:.2f}")
    if chosen is None:
        print(f"nothing found steers toward {concept!r}.")
    elif chosen.vector is not None:
        name = "a DiffMean vector (concept answers - plain answers)" if chosen.kind == "diffmean" else "a learned steering vector"
        print(f"chosen: {name} at {plan.hook}, strength {chosen.strength:g} (|v| = {chosen.strength:g} x {plan.unit:.3g}), "
              f"{chosen.positions} positions: mean cosine {chosen.similarity:.3f}, perplexity x{chosen.perplexity_ratio:.2f}")
        print("  carried by the SAE features (decoder cosine):")
        for f, c in plan.explanation:
            print(f"    {f:>7}  {c:+.3f}  {plan.labels.get(f) or ''}")
    else:
        what = ("one feature" if chosen.kind == "feature" else
                f"a group of {len(chosen.features)} features ({'DiffMean' if chosen.kind == 'contrast' else 'learned'} weights)")
        print(f"chosen: {what}, added at the {chosen.positions} positions, strength {chosen.strength:g}: mean cosine {chosen.similarity:.3f}, "
              f"mentions {chosen.mention_rate:.0%}, perplexity x{chosen.perplexity_ratio:.2f}")
        for f, v in chosen.features:
            print(f"    {f:>7}  add {v:.4g}  {plan.labels.get(f) or ''}")
    for note in plan.notes:
        print(f"note: {note}")
    print(f"({plan.seconds:.0f} s)")
    if chosen is not None:
        print(f"\ntry: monoscope steer --sae {sae_dir} --toward {json.dumps(concept)} --prompt 'Tell me about your day.'")


def cmd_suggest(args: argparse.Namespace) -> int:
    from .toward import plan_steering

    _loud_warnings()
    sae = _open_sae(args)
    db = _db(args, sae)
    lm = _open_model(args, sae)
    plan = plan_steering(lm, sae, args.description, references=args.reference or [], db=db, config=_toward_config(args))
    rows = _suggestion_rows(plan)
    if args.json:
        print(json.dumps(rows[: max(args.top, 1 if plan.chosen is None else len(plan.chosen.features) or 1)], indent=2))
        return 0
    if not plan.candidates:
        print(f"no candidate features for {args.description!r}: nothing in the feature database or the references points to one; "
              "the learned steering vector may still work: monoscope suggest --method vector ...")
    else:
        print(f"features that move {lm.name} toward {args.description!r}, tried by generation (mean MiniLM cosine of the completions with it, "
              "perplexity / unsteered) ranked first by their share of a learned group (score):")
        print(f"  {'feature':>7}  {'cosine':>6}  {'ppl x':>5}  {'score':>7}  source      label")
        for r in rows[: args.top]:
            if r["kind"] != "feature":
                continue
            sim = f"{r['similarity']:.3f}" if r["similarity"] is not None else "   -  "
            ratio = f"{r['perplexity_ratio']:.2f}" if r["perplexity_ratio"] is not None else "  -  "
            print(f"  {r['feature']:>7}  {sim:>6}  {ratio:>5}  {r['score']:+.4f}  {r['source']:<10}  {r['label'] or ''}" + ("  <- chosen" if r["chosen"] else ""))
        print()
    _print_plan(plan, args.sae, args.description)
    return 0


def _add_suggest(sub) -> None:
    p = sub.add_parser("suggest", help="find what steers the model toward a concept ('the ocean', 'talk like a pirate')",
                       description="Find how to steer toward a concept: candidate features from the feature database (search) and from "
                       "what fires on the references and on the model's own text about the concept, ranked by their share of a learned feature group "
                       "that makes that text likely, then tried by generation (a few short continuations each, judged by their MiniLM cosine with the concept "
                       "at a bounded perplexity), alone and as a learned group; with --method vector (or when no feature works, under auto) a "
                       "learned steering vector, explained by the SAE features it points along.")
    p.add_argument("description", help="what to steer toward, e.g. 'the ocean'")
    p.add_argument("--sae", required=True, help="SAE folder")
    p.add_argument("--reference", action="append", help="a short text that matches the description (repeatable; the description itself is always one)")
    p.add_argument("--method", default="auto", choices=["auto", "features", "vector"],
                   help="features, a learned vector, or auto: features, and a learned vector when none moves the text (default: auto)")
    p.add_argument("--top", type=positive_int, default=10, help="features to show (default: 10)")
    p.add_argument("--scale", type=positive_float, default=2.0, help="accepted for compatibility: candidates are now ranked by a learned group and by generation, not by a log-prob gain at a fixed add value")
    p.add_argument("--db", help="feature database (default: features.db next to the SAE, if any)")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_suggest)


# ---------------------------------------------------------------- vectors


def cmd_vector_make(args: argparse.Namespace) -> int:
    from .vectors import contrastive_vector, load_prompts

    positive = load_prompts(args.positive, args.positive_file)
    negative = load_prompts(args.negative, args.negative_file)
    if not positive or not negative:
        which = "positive" if not positive else "negative"
        raise MonoscopeError(f"the {which} prompt set is empty; give --{which} TEXT or --{which}-file FILE (one prompt per line)")
    from ..model import EMBEDDED_MODEL, load_model

    lm = load_model(args.model or EMBEDDED_MODEL, device=args.device, dtype=args.model_dtype)
    hooks = args.hook or [f"resid_post.{lm.n_layers // 2}"]
    vector = contrastive_vector(lm, positive, negative, hooks, position=args.position, chat_template=args.chat_template, name=Path(args.out).stem)
    tensors, meta = vector.save(args.out)
    print(f"wrote {tensors} and {meta}")
    for hook, v in vector.directions.items():
        print(f"  {hook}: |v| = {v.norm():.4g} ({len(positive)} positive, {len(negative)} negative prompts, {args.position} token)")
    print(f"next: monoscope steer --vector {tensors}:4 --prompt '...'   or   monoscope vector export-gguf {tensors} --out {Path(tensors).with_suffix('.gguf')}")
    return 0


def cmd_vector_export(args: argparse.Namespace) -> int:
    from .vectors import SteeringVector, export_gguf, gguf_layer

    vector = SteeringVector.load(args.vector)
    path = export_gguf(vector, args.out, model_hint=args.model_hint, coefficient=args.coefficient)
    layers = ", ".join(f"{h} -> direction.{gguf_layer(h)}" for h in vector.hooks)
    print(f"wrote {path} ({layers}); use it with: llama-cli -m MODEL.gguf --control-vector {path}  (or --control-vector-scaled {path}:SCALE)")
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
        raise MonoscopeError(f"the {which} prompt set is empty; give --{which} TEXT or --{which}-file FILE (or neither set, for the built-in ones)")
    from ..model import EMBEDDED_MODEL, load_model

    lm = load_model(args.model or EMBEDDED_MODEL, device=args.device, dtype=args.model_dtype)
    search = find_refusal_direction(
        lm, harmful, harmless, layers=args.layers, positions=args.positions, openings=args.refusal_opening or REFUSAL_OPENINGS,
        val_fraction=args.val_fraction, max_layer_fraction=args.max_layer_fraction, kl_max=args.kl_max, seed=args.seed,
        progress=not args.json, name=Path(args.out).stem,
    )
    tensors, meta = search.vector.save(args.out)
    if args.json:
        print(json.dumps({"out": str(tensors), **search.to_dict()}, indent=2, allow_nan=False, default=lambda v: None))
        return 0
    c = search.chosen
    print(f"scored {len(search.candidates)} candidates ({len(set(x.layer for x in search.candidates))} layers x "
          f"{len(set(x.position for x in search.candidates))} positions) on {search.n_val} held-out prompts")
    print(f"refusal log-odds ({', '.join(repr(t) for t in search.refusal_tokens[:6])}{', ...' if len(search.refusal_tokens) > 6 else ''}): "
          f"harmful {search.baseline_harmful:+.2f}, harmless {search.baseline_harmless:+.2f}")
    induce = "not measured" if c.induce is None else f"{c.induce:+.2f}"
    kl = "not measured" if c.kl is None else f"{c.kl:.3f}"
    print(f"chosen: resid_pre.{c.layer}, position {c.position}: ablated on harmful {c.bypass:+.2f} "
          f"(drop {search.baseline_harmful - c.bypass:.2f}), added on harmless {induce}, KL on harmless {kl}")
    if not search.passed_filters:
        print("note: no candidate passed the filters (layer, KL, induces refusal); this is the lowest bypass among those with a "
              "small KL (or the smallest KL). A model that seldom refuses has no clear refusal direction.")
    best = sorted((x for x in search.candidates if x.passed), key=lambda x: x.bypass)[:5]
    if not best:
        best = sorted(search.candidates, key=lambda x: x.kl)[:5]
    if best:
        print(f"{'best passing candidates:' if search.passed_filters else 'gentlest candidates:':<26}layer  pos   bypass  induce     kl")
        for x in best:
            induce_x = "      -" if x.induce is None else f"{x.induce:+7.2f}"
            print(f"{'':>26}{x.layer:5d}  {x.position:3d}  {x.bypass:+7.2f} {induce_x}  {x.kl:.3f}")
    print(f"wrote {tensors} and {meta}")
    print(f"next: monoscope ablate-direction --vector {tensors} --prompt '...'")
    return 0


def _add_vector(sub) -> None:
    p = sub.add_parser("vector", help="steering vectors: make a contrastive one, export it for llama.cpp", description="Steering vectors (difference of mean activations between two prompt sets).")
    vsub = p.add_subparsers(dest="vector_command", metavar="ACTION")
    vsub.required = True
    m = vsub.add_parser("make", help="difference of mean activations between positive and negative prompts", description="mean(positive) - mean(negative) activations at the hook point(s), at each prompt's last token or averaged over its tokens; saved as NAME.safetensors + NAME.json.")
    m.add_argument("--positive", action="append", help="a positive prompt (repeatable)")
    m.add_argument("--negative", action="append", help="a negative prompt (repeatable)")
    m.add_argument("--positive-file", action="append", help="file of positive prompts, one per line")
    m.add_argument("--negative-file", action="append", help="file of negative prompts, one per line")
    m.add_argument("--hook", action="append", help="hook point, e.g. resid_post.15 (repeatable; default: the middle resid_post)")
    m.add_argument("--position", default="last", choices=["last", "mean"], help="last token of each prompt, or the mean over its tokens (default: last)")
    m.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template as a user turn")
    m.add_argument("--out", required=True, help="output NAME.safetensors (NAME.json is written beside it)")
    _add_model_args(m)
    m.set_defaults(func=cmd_vector_make)
    r = vsub.add_parser("refusal", help="find a refusal direction: score every layer and position (Arditi et al.)",
                        description="Candidate directions mean(harmful) - mean(harmless) at resid_pre.L for each layer L and each of "
                                    "the last --positions prompt tokens, made on half of the prompts and scored on the other half: the "
                                    "drop of the refusal log-odds on harmful prompts when the direction is ablated, the rise on "
                                    "harmless prompts when it is added, and the KL on harmless prompts when it is ablated. The lowest "
                                    "ablated score among candidates below --max-layer-fraction of the depth, with KL <= --kl-max and "
                                    "a rise when added, is kept. Without prompt sets, small built-in ones are used.")
    r.add_argument("--harmful", action="append", help="a prompt the model should refuse (repeatable)")
    r.add_argument("--harmless", action="append", help="an ordinary prompt (repeatable)")
    r.add_argument("--harmful-file", action="append", help="file of harmful prompts, one per line")
    r.add_argument("--harmless-file", action="append", help="file of harmless prompts, one per line")
    r.add_argument("--layers", type=_layer_range, default=None, help="layers to try, e.g. 4-20 (default: all)")
    r.add_argument("--positions", type=positive_int, default=5, help="last prompt tokens to try (default: 5)")
    r.add_argument("--refusal-opening", action="append", default=None, help="a word a refusal starts with (repeatable; default: I, Sorry, As, ...)")
    r.add_argument("--val-fraction", type=fraction, default=0.5, help="share of the prompts kept for scoring (default: 0.5)")
    r.add_argument("--max-layer-fraction", type=fraction, default=0.8, help="keep candidates below this fraction of the depth (default: 0.8)")
    r.add_argument("--kl-max", type=positive_float, default=0.1, help="largest KL on harmless prompts when ablated (default: 0.1)")
    r.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    r.add_argument("--out", required=True, help="output NAME.safetensors (NAME.json is written beside it, with the scores)")
    r.add_argument("--json", action="store_true", help="print every candidate's scores as JSON")
    _add_model_args(r)
    r.set_defaults(func=cmd_vector_refusal)
    e = vsub.add_parser("export-gguf", help="write a vector as a llama.cpp control vector (GGUF)", description="llama.cpp adds direction.N to the output of block N: a vector at resid_post.N becomes direction.N (N >= 1).")
    e.add_argument("vector", help="NAME.safetensors from `monoscope vector make`")
    e.add_argument("--out", required=True, help="output .gguf file")
    e.add_argument("--coefficient", type=float, default=1.0, help="scale the vector by this (default: 1)")
    e.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the model type recorded with the vector, e.g. llama)")
    e.set_defaults(func=cmd_vector_export)


# ---------------------------------------------------------------- ablate-direction


def cmd_ablate_direction(args: argparse.Namespace) -> int:
    from .ablation import check_bakeable, directional_ablation, save_orthogonalized
    from .generation import generate
    from .vectors import SteeringVector

    _loud_warnings()
    if not args.out and not args.prompt:
        raise MonoscopeError("nothing to do: give --out DIR to write the ablated model, and/or --prompt to compare generations")
    vector = SteeringVector.load(args.vector)
    hook, direction = vector.direction(args.hook)
    from ..model import EMBEDDED_MODEL, load_model

    lm = load_model(args.model or vector.model or EMBEDDED_MODEL, device=args.device, dtype=args.model_dtype)
    if vector.model and lm.name != vector.model:
        from ..sae.interop import same_model

        if not same_model(vector.model, lm.name):
            warnings.warn(f"the vector was made on {vector.model!r} but the model is {lm.name!r}")
    if args.out:
        check_bakeable(lm.model)  # before the preview: a post-norm family cannot take --out
    if args.prompt:
        before = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens, raw=args.raw)
        with directional_ablation(lm.model, direction):
            after = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens, raw=args.raw)
        print(f"direction from {hook} of {args.vector}, ablated at every layer and position")
        print(_side_by_side("ablated", after.text, "original", before.text))
    if args.out:
        out = save_orthogonalized(lm, direction, args.out, note={"vector": str(args.vector), "hook": hook})
        print(f"wrote {out}: {lm.name} with the direction orthogonalised out of its weights (loads in plain transformers: --model {out})")
    return 0


def _add_ablate_direction(sub) -> None:
    p = sub.add_parser("ablate-direction", help="remove a direction everywhere (e.g. refusal); write it into the weights",
                       description="Directional ablation: x -> x - (x.r)r at every layer and position, previewed with --prompt, and baked into a "
                       "new transformers checkpoint with --out (embedding, attention and MLP output weights orthogonalised to r). Post-norm "
                       "families (Gemma 2/3, OLMo 2) cannot be baked exactly: apply it at run time with `steer`/`chat`/`serve --ablate-direction FILE`.")
    p.add_argument("--vector", required=True, help="NAME.safetensors from `monoscope vector make` (e.g. harmful vs harmless prompts)")
    p.add_argument("--hook", default=None, help="which of the vector's hook points to take the direction from (default: its only one)")
    p.add_argument("--out", default=None, help="write the orthogonalised model to this new folder (not for post-norm families)")
    p.add_argument("--prompt", default=None, help="compare generations with and without the ablation")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens to generate for --prompt (default: 40)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    _add_model_args(p)
    p.set_defaults(func=cmd_ablate_direction)


def register(subparsers) -> None:
    """Add the intervention commands to the `monoscope` command line."""
    for add in (_add_steer, _add_chat, _add_attribute, _add_suggest, _add_vector, _add_ablate_direction):
        add(subparsers)
