"""The SAEs a server serves, with their feature databases: loading them, and finding one by name.

A server may serve none (`monoscope serve --model M`: the OpenAI-compatible endpoints only); then every
feature route answers 404 `no_sae` saying how to serve one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import MonoscopeError
from . import schemas as S
from .errors import ApiError

if TYPE_CHECKING:
    from ..features.store import FeatureStore
    from ..model import LoadedModel
    from ..sae.base import SAE

MAP_CACHE_SECONDS = 30


@dataclass
class ServedSAE:
    """One served SAE: its id in requests, folder, hook point and feature database (None before `analyze`)."""

    id: str
    path: Path
    sae: SAE
    hook: str
    store: FeatureStore | None = None
    meaning: bool = False  # the database holds label embeddings: search by meaning works
    _map: tuple[float, S.MapResponse] | None = field(default=None, repr=False)

    def info(self) -> S.SAEInfo:
        meta = self.store.meta if self.store is not None else {}
        cfg = self.sae.cfg
        return S.SAEInfo(
            id=self.id,
            path=str(self.path),
            hook_point=self.hook,
            d_in=int(cfg.d_in),
            d_sae=int(cfg.d_sae),
            architecture=str(cfg.architecture),
            k=getattr(cfg, "k", None),
            has_database=self.store is not None,
            tokens_analysed=meta.get("tokens_analysed"),
            map_method=meta.get("map_method"),
            meaning_search=self.meaning,
        )

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def require_store(self) -> FeatureStore:
        if self.store is None:
            raise ApiError(
                404,
                f"SAE {self.id!r} has no feature database: run `monoscope analyze --sae {self.path}` and restart the server",
                "no_database",
            )
        return self.store

    def check_feature(self, feature: int, param: str = "feature") -> int:
        if not 0 <= int(feature) < self.d_sae:
            raise ApiError(
                404 if param == "feature_id" else 400,
                f"feature {feature} does not exist: SAE {self.id!r} has {self.d_sae} features (0-{self.d_sae - 1})",
                "unknown_feature",
                param,
            )
        return int(feature)

    def cached_map(self) -> S.MapResponse | None:
        if self._map is not None and time.monotonic() - self._map[0] < MAP_CACHE_SECONDS:
            return self._map[1]
        return None

    def remember_map(self, result: S.MapResponse) -> None:
        self._map = (time.monotonic(), result)


class SAERegistry:
    """The served SAEs by id, in the order given (the first is the default of every request)."""

    def __init__(self, saes: Sequence[ServedSAE] = ()):
        self._by_id: dict[str, ServedSAE] = {s.id: s for s in saes}

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __getitem__(self, name: str) -> ServedSAE:
        return self._by_id[name]

    def values(self) -> list[ServedSAE]:
        return list(self._by_id.values())

    def items(self) -> list[tuple[str, ServedSAE]]:
        return list(self._by_id.items())

    def get(self, name: str | None) -> ServedSAE:
        """The SAE a request names (the first served when it names none); 404 when there is no such SAE."""
        if not self._by_id:
            raise ApiError(
                404,
                "this server serves no SAE (only the model): start it with `monoscope serve --sae DIR` for the "
                "feature endpoints",
                "no_sae",
                "sae",
            )
        if name is None or name == "":
            return next(iter(self._by_id.values()))
        found = self._by_id.get(name)
        if found is None:
            raise ApiError(
                404, f"no SAE named {name!r}; this server serves: {', '.join(self._by_id)}", "unknown_sae", "sae"
            )
        return found

    def by_object(self, sae: object) -> ServedSAE:
        return next(s for s in self._by_id.values() if s.sae is sae)

    def close(self) -> None:
        for s in self._by_id.values():
            if s.store is not None:
                with contextlib.suppress(Exception):
                    s.store.close()


# ---------------------------------------------------------------- loading


@dataclass
class LoadedSAE:
    name: str
    path: Path
    sae: SAE
    hook: str
    model: str | None  # the model it says it reads


def read_saes(sae_dirs: Sequence[str], device: str) -> list[LoadedSAE]:
    """Load SAE folders (`DIR` or `NAME=DIR`) with their hook points and the model each records."""
    from ..sae.io import sae_hook_point, sae_model_name
    from ..steer import load_steering_sae

    loaded = []
    for name, path in named_paths(sae_dirs, "SAE"):
        sae = load_steering_sae(path, device=device)
        hook = sae_hook_point(sae)
        if hook is None:
            raise MonoscopeError(f"{path} does not say which hook point it reads (no hook_point in monoscope.json)")
        loaded.append(LoadedSAE(name, Path(path), sae, hook, sae_model_name(sae)))
    return loaded


def model_to_serve(saes: Sequence[LoadedSAE], model: str | None) -> str:
    """`model`, else the one model the SAEs record (SAEs of two models cannot be served together)."""
    from ..sae.interop import same_model

    if model is not None:
        return model
    name = next((s.model for s in saes if s.model), None)
    if name is None:
        if not saes:
            raise MonoscopeError("serve needs a model: pass --model NAME, or --sae DIR (an SAE records its model)")
        raise MonoscopeError("the SAE does not say which model it reads; pass --model")
    for s in saes:
        if s.model and not same_model(s.model, name):
            raise MonoscopeError(
                f"SAE {s.name!r} reads {s.model}, not {name}: serve SAEs of one model at a time (or pass --model)"
            )
    return name


def serve_saes(saes: Sequence[LoadedSAE], lm: LoadedModel) -> list[ServedSAE]:
    """Check each SAE against the model and open its feature database (when `monoscope analyze` wrote one)."""
    from ..features.store import FeatureStore, default_db_path
    from ..steer.steering import check_sae_fits

    served = []
    for s in saes:
        check_sae_fits(s.sae, lm.model, s.hook, lm)
        store = None
        if default_db_path(s.path).is_file():
            store = FeatureStore.for_sae(s.path)
            if store.n_features != s.sae.cfg.d_sae:
                raise MonoscopeError(
                    f"{store.path} describes {store.n_features} features but the SAE has {s.sae.cfg.d_sae}; "
                    f"re-run `monoscope analyze --sae {s.path}`"
                )
        served.append(
            ServedSAE(s.name, s.path, s.sae, s.hook, store, _has_label_vectors(store) if store is not None else False)
        )
    return served


def _has_label_vectors(store: FeatureStore) -> bool:
    try:
        from ..features.embedding import embeddings_available

        return embeddings_available() and store.has_label_embeddings()
    except Exception:  # noqa: BLE001 - an older or odd database: words only
        return False


def named_paths(items: Sequence[str], what: str, strip_suffix: bool = False) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` -> (name, path); names default to the folder or file name and must be unique."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        name, path = None, item
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
            name = name.strip()
            if not name:
                raise MonoscopeError(f"empty {what} name in {item!r}; write NAME=PATH")
        p = Path(path).expanduser()
        if not p.exists() and not (strip_suffix and p.with_suffix(".safetensors").exists()):
            raise MonoscopeError(f"{what} {path} does not exist")
        base = name or ((p.stem if strip_suffix else p.name) or what.lower())
        unique, n = base, 2
        while unique in seen:
            if name:
                raise MonoscopeError(f"two {what}s are named {name!r}; give each its own NAME=")
            unique, n = f"{base}-{n}", n + 1
        seen.add(unique)
        out.append((unique, str(p)))
    return out
