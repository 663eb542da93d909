"""Training SAEs on several processes with torch.distributed (`torchrun --nproc-per-node N -m monoscope train ...`).

Two ways to use N ranks:

- **data parallel** (`mode="data"`, default): every rank holds the same SAEs and trains on its own share of
  every batch; the global batch is `batch_size` tokens, `batch_size / N` per rank. After each backward pass
  the gradients are averaged with `all_reduce` (one call per parameter, in place) before the trainer's own
  decoder-norm projection, clipping and optimiser step, so every rank takes the same step and the parameters stay
  identical (they are broadcast from rank 0 once, after initialisation). We do not wrap the SAE in
  `DistributedDataParallel`: the TopK step uses custom sparse autograd functions and manual decoder-row
  projections between backward and the optimiser step, and a plain all-reduce at that point is simpler and
  independent of how each architecture computes its gradients. The sets of latents that fired are OR-ed
  across ranks (so dead-latent counters agree and count global tokens), floating buffers (BatchTopK's
  threshold average) are averaged, and logged metrics are averaged over ranks.
- **spread** (`mode="spread"`): several SAEs (hook points, widths, k) are dealt round-robin to the ranks; each
  rank trains its own SAEs on the whole stream, with no communication (each keeps its checkpoints in
  `out/checkpoints-rank{R}`).

Data: `shard_source(source, rank, world, split=...)`.
- `split="rows"` (a harvest cache, a tensor file, any source every rank can read): every rank reads the
  same chunks and keeps its own slice of rows of each (`n // N` rows, remainder dropped). The union over
  ranks of a step's rows is exactly what a single process with the same `batch_size` would train on, and
  `iter_from` works as for the source, so resume is free. (Each rank reads whole chunks: with the memory-mapped
  cache this costs page-cache reads, not GPU time.)
- `split="own"` (streaming from the model): each rank's source is already its own data (`shard_corpus` gives
  rank r every N-th document); the wrapper re-cuts it into equal chunks and, before each chunk, the ranks
  agree (one all-reduce of a flag) whether all of them still have data, so they stop together.

Only rank 0 writes logs, checkpoints and the finished SAEs; resuming reads rank 0's newest checkpoint on
every rank. The numbers differ from a single-process run with the same global batch through the loss
normalisation (each rank divides by its own slice's variance), the initialisation (rank 0's slice of the
first batch gives `b_dec`'s geometric median) and, for BatchTopK, the selection itself: each rank keeps the
k * (its rows) largest pre-activations of its own slice, not of the global batch, and its threshold estimate
is the smallest activation it selected, averaged over the ranks (the mean of per-rank minima, not the global
minimum). TopK, JumpReLU and ReLU select per token and are unaffected by the split.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from ..errors import MonoscopeError
from .config import TrainConfig
from .registry import ArchConfig, arch_config_from_flat
from .trainer import SAETrainer, TrainResult, _Run, default_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """The number of processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl with one GPU per rank (`cuda:LOCAL_RANK`) when CUDA is available and `device` is not `cpu`; gloo on CPU.
    Without torchrun (WORLD_SIZE unset or 1) nothing happens and rank 0 of 1 is returned.
    """
    world = world_size()
    if world <= 1:
        return DistInfo(device=str(device) if device and device != "auto" else default_device())
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise MonoscopeError(
                f"rank {rank} has local rank {local} but only {torch.cuda.device_count()} GPUs are visible; "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, f"cuda:{local}" if use_cuda else "cpu")


def _dist():
    import torch.distributed as dist

    return dist


def _inplace(t: Tensor, op: Callable[[Tensor], object]) -> None:
    """Run a collective in place on `t`, which may be a transposed view (W_enc is)."""
    if t.is_contiguous():
        op(t)
    elif t.dim() == 2 and t.T.is_contiguous():
        op(t.T)
    else:
        buf = t.contiguous()
        op(buf)
        t.copy_(buf)


# ---------------------------------------------------------------- data


class ShardedSource:
    """Rank `rank`'s share of a batch source; see the module docstring for the two splits."""

    def __init__(self, source: Any, rank: int, world: int, split: str = "rows", chunk_rows: int | None = None) -> None:
        if split not in ("rows", "own"):
            raise ValueError(f"unknown split {split!r}; use 'rows' or 'own'")
        if split == "own" and not chunk_rows:
            raise ValueError("split='own' needs chunk_rows (the rows each rank yields per chunk)")
        self.source, self.rank, self.world, self.split, self.chunk_rows = source, rank, world, split, chunk_rows

    def __iter__(self) -> Iterator[Any]:
        return self.iter_from(0)

    def iter_from(self, index: int) -> Iterator[Any]:
        if self.split == "rows":
            if hasattr(self.source, "iter_from"):
                return (self._slice(c) for c in self.source.iter_from(index))
            return (self._slice(c) for i, c in enumerate(self.source) if i >= index)
        return self._own(index)

    def _slice(self, chunk: Any) -> Any:
        if isinstance(chunk, Mapping):
            return {key: self._slice(value) for key, value in chunk.items()}
        chunk = torch.as_tensor(chunk)
        flat = chunk.reshape(-1, chunk.shape[-1])
        share = flat.shape[0] // self.world
        return flat[self.rank * share : (self.rank + 1) * share]

    def _own(self, index: int) -> Iterator[Any]:
        dist = _dist()
        rows = self.chunk_rows
        assert rows is not None
        pending: list[Any] = []
        have = 0
        produced = 0
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        iterator = iter(self.source)

        def pull() -> bool:
            nonlocal have
            for item in iterator:
                piece = (
                    item
                    if isinstance(item, Mapping)
                    else torch.as_tensor(item).reshape(-1, torch.as_tensor(item).shape[-1])
                )
                n = next(iter(piece.values())).shape[0] if isinstance(piece, Mapping) else piece.shape[0]
                pending.append(piece)
                have += n
                return True
            return False

        while True:
            while have < rows and pull():
                pass
            flag = torch.tensor([1 if have >= rows else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag.item()) == 0:
                return
            chunk = _take(pending, rows)
            have -= rows
            if produced >= index:
                yield chunk
            produced += 1


def _take(pending: list[Any], rows: int) -> Any:
    """Remove and return the first `rows` rows of the queued pieces (tensors or {key: tensor})."""
    out: list[Any] = []
    need = rows
    while need:
        piece = pending[0]
        n = next(iter(piece.values())).shape[0] if isinstance(piece, Mapping) else piece.shape[0]
        take = min(n, need)
        if isinstance(piece, Mapping):
            out.append({k: v[:take] for k, v in piece.items()})
            rest = {k: v[take:] for k, v in piece.items()}
        else:
            out.append(piece[:take])
            rest = piece[take:]
        if take == n:
            pending.pop(0)
        else:
            pending[0] = rest
        need -= take
    if isinstance(out[0], Mapping):
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
    return torch.cat(out)


def shard_source(
    source: Any, rank: int | None = None, world: int | None = None, split: str = "rows", chunk_rows: int | None = None
) -> Any:
    """This rank's share of `source` (unchanged when running as one process)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = world_size() if world is None else world
    if world <= 1:
        return source
    return ShardedSource(source, rank, world, split, chunk_rows)


class _RankCorpus:
    """A corpus whose `documents()` yields every `world`-th document, starting at `rank`."""

    def __init__(self, corpus: Any, rank: int, world: int) -> None:
        self._corpus, self._rank, self._world = corpus, rank, world

    def documents(self) -> Iterator[str]:
        for i, doc in enumerate(self._corpus.documents()):
            if i % self._world == self._rank:
                yield doc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._corpus, name)


def shard_corpus(corpus: Any, rank: int | None = None, world: int | None = None) -> Any:
    """Rank `rank`'s documents of a `monoscope.data` corpus (unchanged as one process)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = world_size() if world is None else world
    return corpus if world <= 1 else _RankCorpus(corpus, rank, world)


# ---------------------------------------------------------------- trainers


class DistributedSAETrainer(SAETrainer):
    """`SAETrainer` for one data-parallel rank: per-rank batch `batch_size / world`, averaged gradients."""

    def __init__(
        self, configs: Mapping[str, TrainConfig], out_dir: str | os.PathLike, *, dist_info: DistInfo, **options: Any
    ) -> None:
        options.setdefault("device", dist_info.device)
        if not dist_info.is_main:
            options["progress"] = False
        super().__init__(configs, out_dir, **options)
        if self.batch_size % dist_info.world:
            raise MonoscopeError(
                f"the batch size ({self.batch_size}) must be a multiple of the number of processes ({dist_info.world})"
            )
        self.dist_info = dist_info
        self.rank = dist_info.rank
        self.world_size = dist_info.world
        self.global_batch = self.batch_size
        self.batch_size = self.global_batch // self.world_size  # rows per rank and step

    @contextlib.contextmanager
    def _global_batch(self) -> Iterator[None]:
        local = self.batch_size
        self.batch_size = self.global_batch
        try:
            yield
        finally:
            self.batch_size = local

    # ---- synchronisation

    def _initialise(self, runs: list[_Run], inputs: dict[str, Tensor]) -> None:
        super()._initialise(runs, inputs)
        dist = _dist()
        for run in runs:
            with torch.no_grad():
                for tensor in list(run.sae.parameters()) + list(run.sae.buffers()):
                    _inplace(tensor.data, lambda t: dist.broadcast(t, 0))

    def _after_backward(self, run: _Run, output: Any) -> None:
        dist = _dist()
        world = self.world_size
        params = [p for p in run.sae.parameters() if p.requires_grad]
        has = torch.tensor([0 if p.grad is None else 1 for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has)
        with torch.no_grad():
            for p, count in zip(params, has.tolist()):
                if count == 0:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _inplace(p.grad, lambda t: dist.all_reduce(t))
                p.grad.div_(world)
            for buf in run.sae.buffers():
                if buf.is_floating_point():
                    _inplace(buf, lambda t: dist.all_reduce(t))
                    buf.div_(world)
            if output.fired is not None:
                mask = torch.zeros(run.cfg.width, dtype=torch.int32, device=self.device)
                if output.fired.dtype == torch.bool:
                    mask += output.fired.to(torch.int32)
                else:
                    mask[output.fired] = 1
                dist.all_reduce(mask)
                output.fired = mask > 0
            keys = sorted(k for k, v in output.metrics.items() if isinstance(v, (Tensor, float, int)))
            if keys:
                values = torch.stack(
                    [
                        torch.as_tensor(output.metrics[k], dtype=torch.float64, device=self.device).reshape(())
                        for k in keys
                    ]
                )
                dist.all_reduce(values)
                values /= world
                for k, v in zip(keys, values):
                    output.metrics[k] = v

    # ---- only rank 0 writes

    def _prepare_log(self, run: _Run, resumed: bool) -> None:
        if self.rank == 0:
            super()._prepare_log(run, resumed)

    def _flush_logs(self, runs: dict[str, _Run]) -> None:
        for run in runs.values():
            for record in run.pending_logs:
                record["tokens"] = record["step"] * self.global_batch
        if self.rank == 0:
            super()._flush_logs(runs)
        else:
            for run in runs.values():
                run.pending_logs.clear()

    def _checkpoint(self, runs: dict[str, _Run]) -> None:
        if self.rank == 0:
            with self._global_batch():
                super()._checkpoint(runs)

    def _restore_or_start(self, runs: dict[str, _Run]) -> bool:
        resumed = super()._restore_or_start(runs)
        if self.rank != 0:  # never remove (or write) rank 0's checkpoints from another rank
            self.checkpoint_root = self.out_dir / f".checkpoints-unused-rank{self.rank}"
        return resumed

    def _finish(self, run: _Run, complete: bool, started: float) -> None:
        with self._global_batch():
            if self.rank == 0:
                super()._finish(run, complete, started)
            else:
                run.pending_logs.clear()
                sae = run.inference_sae()
                if run.cfg.activation_scale != 1.0:
                    sae.fold_activation_scale(run.cfg.activation_scale)
                run.done = True
                run.result = TrainResult(
                    run.name, sae, run.folder, run.step, run.step * self.batch_size, complete, dict(run.last_metrics)
                )
        _dist().barrier()  # the SAE is on disk before any rank returns

    def _stream_ended(self, runs: dict[str, _Run], started: float) -> None:
        with self._global_batch():
            super()._stream_ended(runs, started)


class _SpreadTrainer(SAETrainer):
    def __init__(
        self, configs: Mapping[str, TrainConfig], out_dir: str | os.PathLike, *, rank: int, **options: Any
    ) -> None:
        super().__init__(configs, out_dir, **options)
        self.checkpoint_root = self.out_dir / f"checkpoints-rank{rank}"


def partition(names: Iterable[str], rank: int, world: int) -> list[str]:
    """The SAE names rank `rank` trains in spread mode: round-robin over the sorted names."""
    return [name for i, name in enumerate(sorted(names)) if i % world == rank]


def train_distributed(
    configs: Mapping[str, TrainConfig],
    batches: Any,
    out_dir: str | os.PathLike,
    *,
    mode: str = "data",
    split: str = "rows",
    single: bool = False,
    **options: Any,
) -> dict[str, TrainResult]:
    """Train `configs` on this process's share of the work; call it on every rank (`torchrun`).

    mode "data": data parallel (every rank trains every SAE on its share of `batches`, which is wrapped with
    `shard_source(batches, split=split)`; for split "own" pass each rank's own stream). mode "spread": each rank
    trains its round-robin share of the SAEs on the whole of `batches`. As one process this is `SAETrainer.fit`.
    Returns this rank's results (in data mode every rank returns every SAE; only rank 0 wrote them).
    """
    info = setup(options.pop("device", None))
    if info.world <= 1:
        return SAETrainer(configs, out_dir, single=single, device=info.device, **options).fit(batches)
    if mode == "data":
        batch = next(iter(configs.values())).batch_size
        source = shard_source(batches, info.rank, info.world, split, chunk_rows=batch // info.world)
        trainer = DistributedSAETrainer(configs, out_dir, dist_info=info, single=single, **options)
        return trainer.fit(source)
    if mode == "spread":
        if single:
            raise MonoscopeError("spread mode deals several SAEs to the ranks; with one SAE use data-parallel mode")
        mine = {name: configs[name] for name in partition(configs, info.rank, info.world)}
        results: dict[str, TrainResult] = {}
        if mine:
            if not info.is_main:
                options["progress"] = False
            results = _SpreadTrainer(mine, out_dir, rank=info.rank, device=info.device, **options).fit(batches)
        _dist().barrier()
        return results
    raise MonoscopeError(f"unknown distribution mode {mode!r}; use 'data' or 'spread'")


#: Optimiser state, in copies of the parameters, and the temporaries its step allocates (also copies).
OPTIMIZER_COPIES = {"adam": 2, "signum": 1, "adam_sf": 2}
OPTIMIZER_STEP_COPIES = {"adam": 1, "signum": 1, "adam_sf": 2}


def estimate_memory(
    d_in: int,
    d_sae: int,
    batch_size: int,
    k: int = 32,
    dtype_bytes: int = 4,
    *,
    architecture: str = "topk",
    optimizer: str = "adam",
    aux: bool = True,
    multi_topk: bool = False,
    bf16_preacts: bool = False,
) -> dict[str, float]:
    """GiB needed to train one SAE, by term (and "total").

    `k`, `aux` (an AuxK term) and `multi_topk` are read by the architectures that have them; see
    `estimate_config_memory` for a whole config.
    """
    arch = arch_config_from_flat(
        architecture, {"k": k, "aux_coefficient": 1 / 32 if aux else 0.0, "multi_topk": multi_topk}
    )
    return _memory_terms(d_in, d_sae, batch_size, arch, dtype_bytes, optimizer, bf16_preacts)


def _memory_terms(
    d_in: int, d_sae: int, batch_size: int, arch: ArchConfig, dtype_bytes: int, optimizer: str, bf16_preacts: bool
) -> dict[str, float]:
    """- weights, gradients (dense, also for the sparse TopK backward), the optimiser's state and its step's temporaries;
    - the batch [batch, d_in] and its few same-sized temporaries (centred input, reconstruction, residual, grads);
    - what the architecture's step keeps alive (`ArchConfig.step_memory`: TopK's pre-activations, selection and
      AuxK; JumpReLU's and ReLU's dense forward and backward).
    """
    gib = 1024**3
    params = (2 * d_in * d_sae + d_sae + d_in) * dtype_bytes
    copies = OPTIMIZER_COPIES.get(optimizer, 2) + OPTIMIZER_STEP_COPIES.get(optimizer, 2)
    terms = {"weights": params, "grads": params, "optimizer": copies * params, "batch": 6 * batch_size * d_in * 4}
    terms.update(arch.step_memory(batch_size, d_in, d_sae, bf16_preacts))
    out = {name: value / gib for name, value in terms.items()}
    out["total"] = sum(terms.values()) / gib
    out["grads_and_adam"] = (terms["grads"] + terms["optimizer"]) / gib  # gradients + optimiser (the earlier key)
    return out


def estimate_config_memory(cfg: TrainConfig, world: int = 1, cuda: bool = False) -> dict[str, float]:
    """`estimate_memory` for one training config, per process when `world` ranks share each batch."""
    return _memory_terms(
        cfg.d_in, cfg.width, max(1, cfg.batch_size // world), cfg.arch, 4, cfg.optim.name, cuda and cfg.bf16_autocast
    )


def describe_memory(configs: Iterable[TrainConfig], world: int = 1, min_gib: float = 1.0) -> str | None:
    """A line estimating each process's training memory for `configs` (None below `min_gib`), and what to do
    when it will not fit the GPU (bf16 autocast, a smaller batch, more GPUs)."""
    configs = list(configs)
    total = sum(estimate_config_memory(c, world, torch.cuda.is_available())["total"] for c in configs)
    if total < min_gib:
        return None
    line = f"memory estimate: {total:.1f} GiB per process (weights, gradients, optimiser state and one batch's activations)"
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        free_gib = free / 1024**3
        line += f"; {free_gib:.1f} GiB free on the GPU"
        if total > free_gib:
            line += " - it will not fit: lower --batch-size, train fewer SAEs at once, or spread them over GPUs (torchrun --distribute spread)"
    return line
