"""What the server serves: one model, the SAEs it reads (none or more) with their feature databases, and
steering vectors; and the services the routes use.

    service.worker     the model worker (worker.py): completions join its continuous batch; other model
                       jobs (scan, search by example, attribution) run between two decoding steps
    service.saes       the served SAEs and feature databases (saes.py)
    service.features   the feature-database views (dashboards.py): SQLite from the web server's threads
    service.jobs       the model jobs other than completions (jobs.py)
    service.steering   the `steering` list of a request as a `Steering` (steering.py)
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Mapping, Sequence, TypeVar

from .. import __version__
from . import schemas as S
from .dashboards import FeatureViews
from .errors import ApiError
from .jobs import ModelJobs
from .saes import SAERegistry, ServedSAE, model_to_serve, named_paths, read_saes, serve_saes
from .steering import Positions, SteeringTranslator
from .worker import DEFAULT_MAX_BATCH, GenerationJob, GenerationResult, ModelWorker

if TYPE_CHECKING:
    import torch

    from ..model import LoadedModel
    from ..steer import Steering
    from ..steer.vectors import SteeringVector

__all__ = ["Service", "ServedSAE", "default_max_tokens", "new_id"]

T = TypeVar("T")
DEFAULT_MAX_TOKENS = (
    256  # when a request gives no max_tokens (OpenAI completions default to 16; chat to "as many as fit")
)
DEFAULT_COMPLETION_TOKENS = 16


class Service:
    """The served model, SAEs, feature databases and vectors, and the services that use them."""

    def __init__(
        self,
        lm: LoadedModel,
        saes: Sequence[ServedSAE] = (),
        *,
        vectors: Mapping[str, SteeringVector] | None = None,
        served_name: str | None = None,
        model_source: str | None = None,
        max_tokens_limit: int = 1024,
        max_queue: int = 64,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body_bytes: int = S.MAX_BODY_BYTES,
        truncate_prompt: bool = False,
        ablate_direction: tuple[str, torch.Tensor] | None = None,
    ):
        self.lm = lm
        # Hooked directional ablation for the life of the service: every forward pass (chat, scan, attribution)
        # sees the model with the direction projected out of its residual stream, as a baked model would be.
        self._hooks = contextlib.ExitStack()
        self.ablated_direction: str | None = None
        if ablate_direction is not None:
            from ..steer.ablation import directional_ablation

            self.ablated_direction = ablate_direction[0]
            self._hooks.enter_context(directional_ablation(lm.model, ablate_direction[1]))
        self.saes = SAERegistry(saes)
        self.vectors: dict[str, SteeringVector] = dict(vectors or {})
        self.model_source = model_source or str(lm.name)
        self.served_name = served_name or _served_name(str(lm.name))
        self.max_tokens_limit = int(max_tokens_limit)
        self.max_body_bytes = int(max_body_bytes)
        self.truncate_prompt = truncate_prompt
        self.created = int(time.time())
        self.worker = ModelWorker(lm, max_queue=max_queue, max_batch=max_batch, truncate_prompt=truncate_prompt)
        self.context_length = self.worker.context_length
        self.features = FeatureViews(self.saes)
        self.jobs = ModelJobs(lm)
        self.translator = SteeringTranslator(lm, self.saes, self.vectors)

    @classmethod
    def load(
        cls,
        sae_dirs: Sequence[str] = (),
        *,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        vectors: Sequence[str] = (),
        served_name: str | None = None,
        ablate_direction: str | None = None,
        max_tokens_limit: int = 1024,
        max_queue: int = 64,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_body_bytes: int = S.MAX_BODY_BYTES,
        truncate_prompt: bool = False,
    ) -> Service:
        """Load SAE folders (`DIR` or `NAME=DIR`; none serves the model alone), the model they read (or
        `model`), their feature databases and steering vector files (`FILE` or `NAME=FILE`); `ablate_direction`
        (`FILE` or `FILE:HOOK`) is projected out of the model's residual stream for as long as the service runs."""
        from ..model import load_model

        loaded = read_saes(sae_dirs, device)
        name = model_to_serve(loaded, model)
        lm = load_model(name, device=device, dtype=dtype)
        ablation = None
        if ablate_direction:
            from ..steer.ablation import load_direction

            ablation = load_direction(ablate_direction, lm.d_model)
        served = serve_saes(loaded, lm)
        loaded_vectors = {}
        if vectors:
            from ..steer import SteeringVector

            for vec_name, vec_path in named_paths(vectors, "vector", strip_suffix=True):
                loaded_vectors[vec_name] = SteeringVector.load(vec_path)
        return cls(
            lm,
            served,
            vectors=loaded_vectors,
            served_name=served_name,
            model_source=name,
            ablate_direction=ablation,
            max_tokens_limit=max_tokens_limit,
            max_queue=max_queue,
            max_batch=max_batch,
            max_body_bytes=max_body_bytes,
            truncate_prompt=truncate_prompt,
        )

    def close(self) -> None:
        self.worker.close()
        self._hooks.close()
        self.saes.close()

    # ---- lookups

    def sae(self, name: str | None) -> ServedSAE:
        """The served SAE a request names (404 when there is none of that name, or none at all)."""
        return self.saes.get(name)

    def check_model(self, name: str | None) -> None:
        if name in (None, "", self.served_name, self.model_source, str(self.lm.name)):
            return
        raise ApiError(
            404,
            f"The model `{name}` does not exist; this server serves `{self.served_name}`",
            "model_not_found",
            "model",
        )

    def max_tokens(self, value: int | None, kind: Literal["chat", "completion"]) -> int:
        """A request's max_tokens (the default of its kind when it gives none), within this server's limit."""
        if value is None:
            return default_max_tokens(kind, self.max_tokens_limit)
        if value > self.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {value}, above this server's limit of {self.max_tokens_limit}",
                "max_tokens_too_large",
                "max_tokens",
            )
        return int(value)

    def info(self, auth: bool) -> S.ServerInfo:
        return S.ServerInfo(
            version=__version__,
            model=self.served_name,
            model_source=self.model_source,
            ablated_direction=self.ablated_direction,
            saes=[s.info() for s in self.saes.values()],
            vectors=[S.VectorInfo(id=k, hook_points=list(v.hooks), model=v.model) for k, v in self.vectors.items()],
            limits=S.Limits(
                max_body_bytes=self.max_body_bytes,
                max_prompt_chars=S.MAX_PROMPT_CHARS,
                max_tokens=self.max_tokens_limit,
                context_length=self.context_length,
                max_steering_items=S.MAX_STEERING_ITEMS,
                max_queue=self.worker.max_queue,
                max_batch=self.worker.max_batch,
            ),
            auth=auth,
        )

    def stats(self) -> S.ServerStats:
        st = self.worker.stats
        return S.ServerStats(
            queued=self.worker.pending,
            running=self.worker.running,
            peak_batch=st.peak_batch,
            generations=st.generations,
            cancelled=st.cancelled,
            failed=st.failed,
            tokens_generated=st.tokens_generated,
            last_cancelled_tokens=st.last_cancelled_tokens,
        )

    # ---- work

    def steering(
        self, items: Sequence[S.SteeringItem] | None, strength: float, positions: Positions
    ) -> tuple[Steering | None, S.SteeringApplied | None]:
        """(Steering or None when there is nothing to steer with, its description)."""
        return self.translator.translate(items, strength, positions)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run a model job (scan, attribution, ...) on the model thread, between two decoding steps."""
        return self.worker.submit(fn, *args)

    def generate(self, job: GenerationJob) -> Future[GenerationResult]:
        """Queue a completion for the batch; the future's result is a `GenerationResult`."""
        return self.worker.generate(job)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def default_max_tokens(kind: Literal["chat", "completion"], limit: int) -> int:
    return min(DEFAULT_MAX_TOKENS if kind == "chat" else DEFAULT_COMPLETION_TOKENS, limit)


def _served_name(name: str) -> str:
    path = Path(name).expanduser()
    try:
        if path.is_file():
            return path.resolve().stem  # a GGUF file: its name without .gguf
        if path.exists():
            return path.resolve().name
    except OSError:
        pass
    return name


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
