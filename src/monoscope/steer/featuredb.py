"""What steering needs from the feature database: each feature's max activation and label, and search.

The database is the SQLite file `monoscope analyze` writes next to the SAE (`features.db`), read through
`monoscope.features.FeatureStore`.

Without a database, max activations are estimated: the model reads a few contexts of the starter corpus and
the SAE encodes them (`estimate_max_activations`, about 2,000 tokens). The estimate is a lower bound of the
database's value (which comes from a much larger pass), so `8x` steers a little softer without one.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Union

import torch

from ..errors import MonoscopeError

if TYPE_CHECKING:  # the store opens lazily: `import monoscope.steer` stays light
    from typing import TypeAlias

    from ..features.store import FeatureStore
    from ..model import LoadedModel
    from ..sae.base import SAE

    # Where max activations come from: {feature: max} (keys may be strings, as JSON has them), a features.db path,
    # an open database, or a callable (sae, [features]) -> {feature: max}.
    MaxActivationSource: TypeAlias = Union[
        Mapping[int, float],
        Mapping[str, float],
        str,
        os.PathLike,
        "FeatureDB",
        FeatureStore,
        Callable[[SAE, list[int]], Mapping[int, float]],
    ]

DB_FILENAME = "features.db"


def default_db_path(sae_dir: str | os.PathLike) -> Path:
    """Where the feature database of the SAE in `sae_dir` lives (whether or not it exists yet)."""
    from ..features.store import default_db_path as store_path

    return Path(store_path(sae_dir))


class FeatureDB:
    """What steering reads from a feature database (`monoscope.features.FeatureStore`): max activations,
    labels, search. Accepts a path or an open store."""

    def __init__(self, path_or_store: str | os.PathLike | FeatureStore):
        from ..features.store import FeatureStore

        if isinstance(path_or_store, FeatureStore):
            self.store = path_or_store
        else:
            path = Path(path_or_store)
            if not path.is_file():
                raise MonoscopeError(
                    f"feature database {path} does not exist; run `monoscope analyze --sae SAE_FOLDER` first, or leave --db out"
                )
            self.store = FeatureStore(path)
        self.path = self.store.path

    def check_fits(self, sae: SAE) -> None:
        if self.store.n_features != sae.cfg.d_sae:
            raise MonoscopeError(
                f"the feature database {self.path} describes {self.store.n_features} features but the SAE has {sae.cfg.d_sae}; "
                "it belongs to another SAE: re-run `monoscope analyze` for this one or pass the right --db"
            )

    def max_activations(self, features: Iterable[int]) -> dict[int, float]:
        ids = sorted({int(f) for f in features})
        return {r.id: float(r.max_activation) for r in self.store.features(ids)}

    def labels(self, features: Iterable[int]) -> dict[int, str]:
        ids = sorted({int(f) for f in features})
        return {r.id: r.label for r in self.store.features(ids) if r.label}

    def all_labels(self) -> dict[int, str]:
        return {r.id: r.label for r in self.store.features() if r.label}

    def search(self, text: str, top: int = 20, mode: str = "hybrid") -> list[tuple[int, float]]:
        """(feature, score) by the database's search over labels: words and meaning fused (`hybrid`), `words`, `meaning`."""
        from ..features.search import search_features

        return [(h.feature_id, float(h.score)) for h in search_features(self.store, text, limit=top, mode=mode)]

    def close(self) -> None:
        self.store.close()


def lookup_max_activations(source: MaxActivationSource | None, sae: SAE, features: list[int]) -> dict[int, float]:
    """Max activations of `features` of `sae` from a dict, a database (path, FeatureDB, FeatureStore) or a callable."""
    from ..features.store import FeatureStore

    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike, FeatureStore)):
        source = FeatureDB(source)
    if isinstance(source, FeatureDB):
        source.check_fits(sae)
        return source.max_activations(features)
    if isinstance(source, Mapping):
        by_name = {str(key): value for key, value in source.items()}  # JSON gives string keys
        return {f: float(by_name[str(f)]) for f in features if str(f) in by_name}
    if callable(source):
        return {int(k): float(v) for k, v in dict(source(sae, features)).items()}
    raise MonoscopeError(
        f"max_activations must be a dict, a features.db path or a callable, got {type(source).__name__}"
    )


_ESTIMATES: "weakref.WeakKeyDictionary[SAE, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def estimate_max_activations(
    loaded: LoadedModel,
    sae: SAE,
    hook: str,
    features: Iterable[int] | None = None,
    *,
    corpus: str = "starter",
    contexts: int = 32,
    context_size: int = 64,
    batch_size: int = 8,
) -> dict[int, float]:
    """Max activation of each feature over `contexts` packed contexts of `corpus` (BOS position left out).

    The fallback when no feature database exists; computed once per SAE and hook in a process.
    """
    from itertools import islice

    from ..data import open_corpus, pack_contexts
    from ..model import run_to

    per_sae = _ESTIMATES.setdefault(sae, {})
    maxima = per_sae.get(str(hook))
    if maxima is None:
        docs = open_corpus(corpus).documents()
        ctxs = list(islice(pack_contexts(docs, loaded.tokenizer, context_size), contexts))
        if not ctxs:
            raise MonoscopeError(f"corpus {corpus!r} gave no contexts to estimate max activations from")
        maxima = torch.zeros(sae.cfg.d_sae)
        device = next(loaded.model.parameters()).device
        for start in range(0, len(ctxs), batch_size):
            ids = torch.stack(ctxs[start : start + batch_size]).to(device)
            x = run_to(loaded.model, [hook], ids)[hook][:, 1:]
            codes = sae.encode(x.to(sae.W_dec.device))
            maxima = torch.maximum(maxima, codes.reshape(-1, codes.shape[-1]).amax(0).float().cpu())
        per_sae[str(hook)] = maxima
        warnings.warn(
            f"no feature database: max activations estimated from {sum(c.numel() - 1 for c in ctxs):,} tokens of the {corpus} corpus "
            "(run `monoscope analyze` for exact values)",
            stacklevel=2,
        )
    wanted = range(sae.cfg.d_sae) if features is None else features
    return {int(f): float(maxima[int(f)]) for f in wanted}
