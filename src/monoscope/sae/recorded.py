"""What an SAE recorded about its training, read back to reopen the model, hook point and corpus it saw.

`monoscope.json` (`model`, `hook_point`, `context_size`, `corpus`, `harvest_contexts`) first, then SAELens's
cfg.json metadata (`model_name`, `hook_name`, `context_size`), so SAEs trained elsewhere reopen too. monoscope
records the corpus as open_corpus's keywords (`spec`, `seed`, ...); a hand-written or foreign monoscope.json
may hold a plain spec string instead, and both read the same here. `eval`, `analyze`, `steer`, `scan` and
the other commands that take `--sae` reopen through this one module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..data import Corpus, open_corpus
from ..errors import MonoscopeError
from .base import SAE
from .io import sae_hook_point, sae_model_name

#: Context size of an SAE that records none (monoscope's harvest default).
DEFAULT_CONTEXT_SIZE = 128


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _whole(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)  # type: ignore[call-overload]  # numbers and numeric strings; anything else is unknown
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RecordedCorpus:
    """The training corpus as recorded; None for each part not recorded."""

    spec: str | None = None
    seed: int | None = None
    text_column: str | None = None
    split: str | None = None
    dataset_config: str | None = None

    @classmethod
    def from_info(cls, info: Mapping[str, object]) -> "RecordedCorpus":
        """From monoscope.json's `corpus`: open_corpus's keywords, a plain spec string, or nothing."""
        corpus = info.get("corpus")
        if isinstance(corpus, str):
            return cls(spec=_text(corpus.strip()))
        if isinstance(corpus, Mapping):
            return cls(
                spec=_text(corpus.get("spec")),
                seed=_whole(corpus.get("seed")),
                text_column=_text(corpus.get("text_column")),
                split=_text(corpus.get("split")),
                dataset_config=_text(corpus.get("dataset_config")),
            )
        return cls()

    def reopen(
        self,
        spec: str | None = None,
        *,
        seed: int | None = None,
        text_column: str | None = None,
        split: str | None = None,
        dataset_config: str | None = None,
    ) -> Corpus:
        """The recorded corpus (starter when none is recorded), each given part overriding the record. Another
        `spec` than the recorded one starts from open_corpus's defaults: the record describes other text."""
        same = spec is None or spec == (self.spec or "starter")
        base = self if same else RecordedCorpus()
        return open_corpus(
            spec or self.spec or "starter",
            seed=seed if seed is not None else base.seed or 0,
            text_column=text_column or base.text_column or "text",
            split=split or base.split or "train",
            dataset_config=dataset_config if dataset_config is not None else base.dataset_config,
        )

    def is_source_of(self, corpus: Corpus) -> bool:
        """Whether `corpus` is the recorded text in the recorded order, so the training text comes first in it."""
        return self.spec is not None and self.spec == corpus.spec and self.seed == corpus.seed


@dataclass(frozen=True)
class SAERecord:
    """Model, hook point, context size and corpus an SAE was trained on; None where nothing was recorded."""

    model: str | None = None
    hook: str | None = None
    context_size: int | None = None
    corpus: RecordedCorpus = field(default_factory=RecordedCorpus)
    harvest_contexts: int = 0  # contexts of the corpus the training read: held-out text starts after them

    @classmethod
    def of(cls, sae: SAE) -> "SAERecord":
        info: Mapping[str, object] = sae.info if isinstance(sae.info, Mapping) else {}
        metadata: Mapping[str, object] = getattr(sae.cfg, "metadata", None) or {}
        context_size = _whole(info.get("context_size"))
        return cls(
            model=sae_model_name(sae),
            hook=sae_hook_point(sae),
            context_size=context_size if context_size is not None else _whole(metadata.get("context_size")),
            corpus=RecordedCorpus.from_info(info),
            harvest_contexts=_whole(info.get("harvest_contexts")) or 0,
        )

    def model_name(self, model: str | None = None, *, fallback: str | None = None, what: str = "the SAE") -> str:
        """`model` when given, else the recorded model, else `fallback`; a user-fixable error when there is none
        or when the recorded model is a local folder that is not here."""
        if model:
            return model
        if self.model:
            if self.model.startswith((".", "/", "~")) and not Path(self.model).expanduser().exists():
                raise MonoscopeError(f"{what} was trained on {self.model}, which is not here; pass --model")
            return self.model
        if fallback:
            return fallback
        raise MonoscopeError(f"{what} does not say which model it reads (no model in monoscope.json); pass --model")

    def hook_point(self, hook: str | None = None, *, what: str = "the SAE") -> str:
        """`hook` when given, else the recorded hook point; a user-fixable error when there is none."""
        from ..model import HookPoint

        if hook:
            return str(HookPoint.parse(hook))
        if self.hook:
            return self.hook
        raise MonoscopeError(
            f"{what} does not say which hook point it reads (no hook_point in monoscope.json); pass --hook"
        )

    def context(self, context_size: int | None = None) -> int:
        """`context_size` when given, else the recorded one, else 128."""
        return context_size or self.context_size or DEFAULT_CONTEXT_SIZE
