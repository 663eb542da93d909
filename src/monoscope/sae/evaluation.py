"""`monoscope eval` as one library call: reopen the model, hook point and corpus an SAE recorded, evaluate the
SAE on held-out text after its training text (`lm_eval.evaluate_sae`) and write `eval.json` next to it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..config import JsonConfig, require
from ..model import LoadedModel

EVAL_FILENAME = "eval.json"


@dataclass
class EvalConfig(JsonConfig):
    """How much held-out text to read and how to sample it; `help` is what `monoscope eval --help` says."""

    tokens: int = field(default=8192, metadata={"help": "held-out tokens"})
    context_size: int | None = field(
        default=None,
        metadata={"help": "tokens per context, BOS included", "default_help": "the SAE's training context size"},
    )
    sample_seed: int = field(
        default=0,
        metadata={"help": "seed of the held-out contexts sampled across the held-out text and of the bootstrap"},
    )
    untouched_positions: int = field(
        default=1,
        metadata={
            "help": "positions at the start of each context left as they are and not scored: 1 = BOS; 2 also skips "
            "the first token after BOS, whose outsized activations dominate FVU in some models (SmolLM2)"
        },
    )

    def __post_init__(self) -> None:
        require(self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(
            self.context_size is None or self.context_size > 0,
            f"context size must be positive, got {self.context_size}",
        )
        require(self.untouched_positions >= 1, f"untouched positions start at 1 (BOS), got {self.untouched_positions}")


@dataclass
class EvalRun:
    """What `evaluate_folder` measured (`result`, as written to eval.json) and on what."""

    result: dict[str, Any]
    model: str
    hook: str
    skip_contexts: int  # training contexts skipped: the held-out text starts after them
    path: Path  # eval.json


def evaluate_folder(
    sae_dir: str | os.PathLike[str],
    config: EvalConfig | None = None,
    *,
    model: str | None = None,
    hook: str | None = None,
    corpus: str | None = None,
    seed: int | None = None,
    text_column: str | None = None,
    split: str | None = None,
    dataset_config: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    loaded: LoadedModel | None = None,
) -> EvalRun:
    """Evaluate the SAE in `sae_dir`. Model, hook point, corpus (and its seed, so the held-out text follows the
    training text) and context size default to what the SAE recorded; `loaded` is used when it is that model."""
    from ..model import load_model
    from .lm_eval import evaluate_sae, held_out_skip
    from .loader import load_sae
    from .recorded import SAERecord

    cfg = config or EvalConfig()
    sae = load_sae(sae_dir)
    record = SAERecord.of(sae)
    model_name = record.model_name(model)
    hook_point = record.hook_point(hook)
    text = record.corpus.reopen(corpus, seed=seed, text_column=text_column, split=split, dataset_config=dataset_config)
    if loaded is None or loaded.name != model_name:
        loaded = load_model(model_name, device=device, dtype=dtype)
    skip = held_out_skip(sae.info, text)
    result = evaluate_sae(
        sae,
        loaded,
        text,
        hook_point=hook_point,
        tokens=cfg.tokens,
        context_size=record.context(cfg.context_size),
        skip_contexts=skip,
        seed=cfg.sample_seed,
        untouched_positions=cfg.untouched_positions,
    )
    path = Path(sae_dir) / EVAL_FILENAME
    atomic_write_json(path, result)
    return EvalRun(result=result, model=model_name, hook=hook_point, skip_contexts=skip, path=path)
