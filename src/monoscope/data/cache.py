"""On-disk activation cache: sharded safetensors plus one JSON manifest, written so a crash loses nothing.

Layout of a cache folder:

- `activations.json`: the manifest (model, hook points, d_model, dtype, corpus, seed, per-hook scale
  factors, shard list, how many contexts are done, whether the harvest is complete);
- `shard-00000.safetensors`, ...: one tensor per hook point (`resid_post.15`: [n, d_model], raw model scale,
  in the cache dtype), plus `token_ids`, `context_index` and `position` (int32) for every row.

Each shard is written atomically and only then added to the manifest (also atomic), so after an interruption
every listed shard is whole; re-running the same harvest continues from the first context not yet stored.
Readers memory-map shards (safetensors), so caches larger than RAM are fine, and apply the stored scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from .. import __version__
from .._io import atomic_save_safetensors, atomic_write_json, read_json
from ..errors import MonoscopeError
from ..model import LoadedModel, load_model
from ..progress import progress_bar
from .harvest import HarvestBatch, HarvestConfig, Harvester, check_finite, scale_factor

MANIFEST = "activations.json"
FORMAT = "monoscope-activations"
FORMAT_VERSION = 1
_IDENTITY_FIELDS = (
    "model",
    "hook_points",
    "corpus",
    "text_column",
    "split",
    "dataset_config",
    "context_size",
    "seed",
    "cache_dtype",
)
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Rows of float32 held in RAM at once when shuffling a cache for training.
DEFAULT_WINDOW_BYTES = 512 * 2**20


@dataclass
class HarvestReport:
    folder: Path
    n_tokens: int
    new_tokens: int
    n_shards: int
    seconds: float
    scale_factors: dict[str, float]
    resumed: bool
    already_complete: bool

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def _identity(cfg: HarvestConfig) -> dict[str, Any]:
    data = cfg.to_dict()
    return {key: data[key] for key in _IDENTITY_FIELDS}


def _check_same_harvest(folder: Path, manifest: dict[str, Any], cfg: HarvestConfig) -> None:
    stored = manifest.get("harvest", {})
    wanted = _identity(cfg)
    diffs = [
        f"{key}: cache has {stored.get(key)!r}, asked for {wanted[key]!r}"
        for key in _IDENTITY_FIELDS
        if stored.get(key) != wanted[key]
    ]
    if diffs:
        raise MonoscopeError(
            f"{folder} holds a different harvest ({'; '.join(diffs)}); pass another --out or delete that folder"
        )


class _ShardWriter:
    """Accumulates harvest batches and writes a shard each time `shard_tokens` rows are buffered."""

    def __init__(self, folder: Path, manifest: dict[str, Any], cfg: HarvestConfig):
        self.folder = folder
        self.manifest = manifest
        self.cfg = cfg
        self.dtype = _TORCH_DTYPES[cfg.cache_dtype]
        self.pending: list[HarvestBatch] = []
        self.pending_tokens = 0

    def add(self, batch: HarvestBatch) -> None:
        self.pending.append(batch)
        self.pending_tokens += batch.n_tokens
        if self.pending_tokens >= self.cfg.shard_tokens:
            self.flush()

    def flush(self, complete: bool = False) -> None:
        manifest = self.manifest
        if self.pending:
            if manifest["scale_factors"] is None:
                manifest["scale_factors"] = {
                    name: scale_factor(
                        torch.cat([b.activations[name] for b in self.pending])[: self.cfg.norm_sample_tokens]
                    )
                    for name in self.cfg.hook_points
                }
            tensors: dict[str, torch.Tensor] = {}
            for name in self.cfg.hook_points:
                stored = torch.cat([b.activations[name] for b in self.pending]).to(self.dtype).cpu()
                if not torch.isfinite(stored).all():
                    raise MonoscopeError(
                        f"activations at {name} overflow {self.cfg.cache_dtype}; harvest again with --cache-dtype float32 or bfloat16"
                    )
                tensors[name] = stored
            tensors["token_ids"] = torch.cat([b.token_ids for b in self.pending]).to(torch.int32)
            tensors["context_index"] = torch.cat([b.context_index for b in self.pending]).to(torch.int32)
            tensors["position"] = torch.cat([b.position for b in self.pending]).to(torch.int32)
            index = len(manifest["shards"])
            name = f"shard-{index:05d}.safetensors"
            atomic_save_safetensors(self.folder / name, tensors, metadata={"format": FORMAT})
            manifest["shards"].append({"file": name, "tokens": self.pending_tokens})
            manifest["n_tokens"] += self.pending_tokens
            manifest["contexts_done"] += sum(b.n_contexts for b in self.pending)
            self.pending, self.pending_tokens = [], 0
        manifest["complete"] = complete
        atomic_write_json(self.folder / MANIFEST, manifest)


def harvest_to_cache(
    cfg: HarvestConfig,
    out: str | Path,
    *,
    loaded: LoadedModel | None = None,
    show_progress: bool = True,
) -> HarvestReport:
    """Harvest `cfg.tokens` tokens of activations into `out`, continuing an interrupted run of the same harvest."""
    folder = Path(out).expanduser()
    corpus = cfg.open_corpus()
    manifest_path = folder / MANIFEST
    resumed = False
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise MonoscopeError(f"{folder} is not a monoscope activation cache; pass another --out")
        _check_same_harvest(folder, manifest, cfg)
        if manifest["n_tokens"] >= cfg.tokens and manifest.get("complete"):
            return HarvestReport(
                folder, manifest["n_tokens"], 0, len(manifest["shards"]), 0.0, manifest["scale_factors"], False, True
            )
        resumed = manifest["n_tokens"] > 0
    else:
        if folder.exists() and any(folder.iterdir()):
            raise MonoscopeError(f"{folder} exists and is not empty; pass a new folder to --out")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "monoscope_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "harvest": cfg.to_dict(),
            "d_model": None,
            "n_layers": None,
            "scale_factors": None,
            "n_tokens": 0,
            "contexts_done": 0,
            "shards": [],
            "complete": False,
        }
    if loaded is None:
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    manifest["d_model"], manifest["n_layers"] = loaded.d_model, loaded.n_layers
    manifest["harvest"]["tokens"] = cfg.tokens
    harvester = Harvester(loaded, corpus, cfg.hook_points, cfg.context_size, cfg.batch_size)
    writer = _ShardWriter(folder, manifest, cfg)
    start_tokens = manifest["n_tokens"]
    started = time.perf_counter()
    bar = progress_bar(total=cfg.tokens, desc="harvest", unit="tok", initial=start_tokens, enabled=show_progress)
    try:
        with torch.inference_mode():
            for batch in harvester.batches(skip_contexts=manifest["contexts_done"]):
                check_finite(batch, f"context {int(batch.context_index[0])}")
                writer.add(batch)
                bar.update(batch.n_tokens)
                if manifest["n_tokens"] + writer.pending_tokens >= cfg.tokens:
                    break
        writer.flush(complete=True)
    finally:
        bar.close()
    if manifest["n_tokens"] < cfg.tokens:
        print(f"monoscope: the corpus ran out after {manifest['n_tokens']} tokens (asked for {cfg.tokens})")
    return HarvestReport(
        folder,
        manifest["n_tokens"],
        manifest["n_tokens"] - start_tokens,
        len(manifest["shards"]),
        time.perf_counter() - started,
        manifest["scale_factors"],
        resumed,
        False,
    )


class ActivationCache:
    """Read access to a cache folder, or to one safetensors file with an `activations` tensor [N, d]."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            if not (self.path / MANIFEST).is_file():
                raise MonoscopeError(
                    f"{self.path} is not an activation cache (no {MANIFEST}); harvest into it with `monoscope harvest`"
                )
            self.manifest = read_json(self.path / MANIFEST)
            if self.manifest.get("format") != FORMAT:
                raise MonoscopeError(f"{self.path / MANIFEST} is not a monoscope activation manifest")
            if not self.manifest["shards"]:
                raise MonoscopeError(f"{self.path} holds no finished shard yet")
            self.hook_points: list[str] = list(self.manifest["harvest"]["hook_points"])
            self.shards = [(self.path / s["file"], int(s["tokens"])) for s in self.manifest["shards"]]
            self._keys = {p: p for p in self.hook_points}
        elif self.path.is_file():
            self._open_single_file()
        else:
            raise MonoscopeError(f"activations {self.path} do not exist")
        self.n_tokens = sum(n for _, n in self.shards)

    def _open_single_file(self) -> None:
        if self.path.suffix != ".safetensors":
            raise MonoscopeError(f"{self.path} is not a .safetensors file or a cache folder")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                keys = list(f.keys())
                if "activations" not in keys:
                    raise MonoscopeError(
                        f"{self.path} has no 'activations' tensor (found: {', '.join(keys) or 'none'})"
                    )
                shape = f.get_slice("activations").get_shape()
                meta = f.metadata() or {}
        except MonoscopeError:
            raise
        except Exception as err:
            raise MonoscopeError(f"cannot read {self.path} as safetensors: {err}") from err
        if len(shape) != 2:
            raise MonoscopeError(f"'activations' in {self.path} must be 2-D [tokens, d_model], got shape {list(shape)}")
        hook = meta.get("hook_point", "activations")
        self.hook_points = [hook]
        self._keys = {hook: "activations"}
        self.shards = [(self.path, int(shape[0]))]
        scale = float(meta["scale_factor"]) if "scale_factor" in meta else None
        self.manifest = {
            "format": "safetensors-file",
            "harvest": {"model": meta.get("model"), "hook_points": [hook], "context_size": None, "corpus": None},
            "d_model": int(shape[1]),
            "scale_factors": {hook: scale} if scale is not None else None,
            "n_tokens": int(shape[0]),
            "complete": True,
        }

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def model_name(self) -> str | None:
        return self.manifest["harvest"].get("model")

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def hook(self, hook_point: str | None) -> str:
        if hook_point is None:
            if len(self.hook_points) > 1:
                raise MonoscopeError(
                    f"{self.path} holds several hook points ({', '.join(self.hook_points)}); say which one"
                )
            return self.hook_points[0]
        if hook_point not in self._keys:
            raise MonoscopeError(
                f"{self.path} has no activations for {hook_point}; it holds {', '.join(self.hook_points)}"
            )
        return hook_point

    def scale_factor(self, hook_point: str | None = None) -> float:
        hook = self.hook(hook_point)
        factors = self.manifest.get("scale_factors")
        if not factors or factors.get(hook) is None:
            sample = self.read_shard(0, hook)[:16_384]
            factors = dict(factors or {})
            factors[hook] = scale_factor(sample)
            self.manifest["scale_factors"] = factors
        return float(factors[hook])

    def read_shard(self, index: int, hook_point: str | None = None, column: str | None = None) -> torch.Tensor:
        """One shard's rows of a hook point's activations (raw scale) or of an index column."""
        path, _ = self.shards[index]
        key = column or self._keys[self.hook(hook_point)]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    def read_all(
        self, hook_point: str | None = None, *, normalize: bool = True, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        hook = self.hook(hook_point)
        rows = torch.cat([self.read_shard(i, hook).to(dtype) for i in range(len(self.shards))])
        return rows * self.scale_factor(hook) if normalize else rows

    def batches(
        self,
        batch_size: int,
        hook_point: str | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        normalize: bool = True,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> "CacheBatches":
        hook = self.hook(hook_point)
        if batch_size > self.n_tokens:
            raise MonoscopeError(
                f"batch size {batch_size} is larger than the cache ({self.n_tokens} tokens); harvest more or use a smaller batch"
            )
        return CacheBatches(
            self, hook, batch_size, shuffle=shuffle, seed=seed, normalize=normalize, window_bytes=window_bytes
        )


class CacheBatches:
    """An endless, epoch-by-epoch stream of [batch_size, d] float32 batches from a cache.

    Each epoch visits the shards in a seeded random order, in windows of several shards whose rows are
    shuffled together. Batch i is a pure function of (seed, i), so `iter_from(i)` restarts there cheaply —
    the trainer's resume protocol.
    """

    def __init__(
        self,
        cache: ActivationCache,
        hook: str,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        normalize: bool,
        window_bytes: int,
    ):
        self.cache = cache
        self.hook = hook
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.scale = cache.scale_factor(hook) if normalize else 1.0
        self.window_tokens = max(batch_size, window_bytes // (4 * cache.d_model))
        self.batches_per_epoch = cache.n_tokens // batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_from(0)

    def _epoch_windows(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.cache.shards)))
        if self.shuffle:
            order = torch.randperm(
                len(order), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            ).tolist()
        windows: list[list[int]] = [[]]
        filled = 0
        for index in order:
            if filled >= self.window_tokens:
                windows.append([])
                filled = 0
            windows[-1].append(index)
            filled += self.cache.shards[index][1]
        return windows

    def _window_rows(self, epoch: int, w: int, shards: list[int]) -> torch.Tensor:
        rows = torch.cat([self.cache.read_shard(i, self.hook).float() for i in shards])
        if self.shuffle:
            perm = torch.randperm(
                rows.shape[0], generator=torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + w)
            )
            rows = rows[perm]
        return rows * self.scale if self.scale != 1.0 else rows

    def iter_from(self, batch_index: int) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(batch_index, self.batches_per_epoch)
        skip_rows = offset * self.batch_size
        while True:
            carry: torch.Tensor | None = None
            emitted = offset
            for w, shards in enumerate(self._epoch_windows(epoch)):
                n_rows = sum(self.cache.shards[i][1] for i in shards)
                if skip_rows >= n_rows:
                    skip_rows -= n_rows
                    continue
                rows = self._window_rows(epoch, w, shards)[skip_rows:]
                skip_rows = 0
                if carry is not None:
                    rows = torch.cat([carry, rows])
                usable = rows.shape[0] // self.batch_size * self.batch_size
                for start in range(0, usable, self.batch_size):
                    if emitted >= self.batches_per_epoch:
                        break
                    yield rows[start : start + self.batch_size]
                    emitted += 1
                carry = rows[usable:]
            epoch, offset, skip_rows = epoch + 1, 0, 0


def estimate_disk_bytes(n_tokens: int, d_model: int, n_points: int, dtype: str) -> int:
    width = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    return n_tokens * (d_model * width * n_points + 12)


def describe_size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"
