"""`monoscope chat`: a terminal chat with a steerable model, whose equalizer /set, /off, /list... change between turns."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TYPE_CHECKING, Callable, TextIO, cast

from ..cli_common import Parsers, add_model_args
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
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..model import LoadedModel
    from ..sae import SAE
    from .featuredb import FeatureDB


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

    def __init__(
        self,
        lm: "LoadedModel",
        sae: "SAE | None",
        db: "FeatureDB | None",
        args: argparse.Namespace,
        out: TextIO = sys.stdout,
    ):
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

            self.steering.strength = check_number(rest[0], "strength")  # pyright: ignore[reportArgumentType]  # it parses text
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

        from .runtime import encode_prompt

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

        from .runtime import generation_kwargs
        from .steering import steer

        # transformers' decorators hide `generate`'s signature from the type checker
        generate = cast("Callable[..., object]", self.lm.model.generate)
        tokenizer = cast("PreTrainedTokenizerBase", self.lm.tokenizer)
        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        kw = generation_kwargs(
            tokenizer, self.args.max_new_tokens, self.args.temperature, self.args.top_p, self.args.seed
        )
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kw)
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
    loud_warnings()
    sae = open_sae(args)
    db = feature_db(args, sae)
    lm = open_model(args, sae)
    ablated, ablation = ablation_from_args(args, lm)
    with ablation:
        return _chat_loop(ChatSession(lm, sae, db, args), args, lm, ablated)


def _chat_loop(session: "ChatSession", args: argparse.Namespace, lm: "LoadedModel", ablated: str | None) -> int:
    for spec in args.feature or []:
        session.command(f"/set {spec.replace('=', ' ', 1)}")
    interactive = sys.stdin.isatty()
    session.say(
        f"monoscope chat with {lm.name}"
        + (f" (SAE {args.sae})" if args.sae else "")
        + (f", {ablated} ablated" if ablated else "")
        + "; /help for commands, /quit to leave"
    )
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


def add_chat(sub: Parsers) -> None:
    p = sub.add_parser(
        "chat",
        help="chat in the terminal with a steerable model (/set, /off, /list, /strength, /reset)",
        description="A terminal chat with the model (the embedded SmolLM2-135M-Instruct by default). Between turns, "
        "/set ID VALUE clamps a feature (or /set ID add:4), /off ID removes it, /list shows the equalizer, "
        "/strength S scales it, /reset flattens it, /quit leaves.",
    )
    p.add_argument("--sae", help="SAE folder whose features /set refers to")
    p.add_argument("--feature", action="append", metavar="ID=MODE:VALUE", help="start with this edit (repeatable)")
    add_positions_arg(p)
    add_db_arg(p)
    add_ablate_arg(p)
    add_generation_args(p, default_tokens=60)
    add_model_args(p, None, SAE_MODEL)
    p.set_defaults(func=cmd_chat)
