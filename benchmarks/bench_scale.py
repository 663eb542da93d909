"""How TopK SAE training scales on this CPU: time per token vs d_sae and vs k, and a memory-mapped cache vs RAM.

    .venv/bin/python benchmarks/bench_scale.py            # about 2 minutes on a 2-core machine
    .venv/bin/python benchmarks/bench_scale.py --quick    # smaller, for a smoke test

1. d_sae in (4k, 16k, 64k) at k = 32, and k in (8, 32, 128) at d_sae = 16k (d_in 576, SmolLM2-135M's width):
   median step time of `train_sae` over the timed steps, as microseconds per token, next to the time of the
   step's one dense encoder GEMM ([batch, d_in] @ [d_in, d_sae], timed alone): the share of the GEMM limit.
   Per-token cost should grow about linearly with d_sae (the GEMM) and only slightly with k (the sparse part).
   Dead-latent revival (AuxK) is off (`dead_tokens` huge): in runs this short it would dominate.
2. The same run (d_sae 4608, k 32, batch 4096) fed (a) from a memory-mapped activation file through
   `ActivationCache(...).batches()` (fp16 on disk, shuffled windows, scaled to float32 on read) and (b) from
   float32 batches already in RAM. Target: cache throughput >= 0.9x RAM. The two alternate in blocks so
   other load on the machine hits both.

Synthetic activations (`monoscope.sae.synthetic`) stand in for a model's; no model is loaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from monoscope.sae import TrainConfig, train_sae  # noqa: E402
from monoscope.sae.distributed import estimate_memory  # noqa: E402
from monoscope.sae.synthetic import SyntheticActivations  # noqa: E402


class Timed:
    """Replays `chunks` (or pulls from `source`) and records when the trainer asks for each one."""

    def __init__(self, chunks=None, source=None, n=None):
        self.chunks, self.source, self.n = chunks, source, n
        self.stamps: list[float] = []

    def __iter__(self):
        items = iter(self.chunks) if self.chunks is not None else iter(self.source)
        for i, chunk in enumerate(items):
            if self.n is not None and i >= self.n:
                return
            self.stamps.append(time.perf_counter())
            yield chunk

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps[skip:], self.stamps[skip + 1 :])]


def gemm_seconds(batch: int, d_in: int, d_sae: int, reps: int = 3) -> float:
    x, w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    x @ w
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t)
    return min(times)


def time_training(d_in: int, d_sae: int, k: int, batch: int, steps: int, warmup: int, chunks) -> float:
    """Median seconds per step of train_sae (timed steps only)."""
    timed = Timed(chunks=chunks[: steps + warmup + 1])
    # dead_tokens: a run this short would call every latent that has not fired yet "dead" after one batch and
    # spend its time on AuxK; a long run has few dead latents, so the steady-state step is measured without them.
    cfg = TrainConfig(
        d_in=d_in, d_sae=d_sae, k=k, batch_size=batch, total_tokens=batch * (steps + warmup), dead_tokens=10**9
    )
    with tempfile.TemporaryDirectory() as out:
        train_sae(cfg, timed, out, progress=False, device="cpu", checkpoint_every_tokens=batch * 10**6)
    return statistics.median(timed.step_times(warmup))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    ap.add_argument("--d-in", type=int, default=576)
    args = ap.parse_args()
    torch.manual_seed(0)
    d_in = args.d_in
    widths = (1024, 4096, 8192) if args.quick else (4096, 16384, 65536)
    ks = (8, 32, 128)
    batch, steps, warmup = (512, 3, 1) if args.quick else (1024, 5, 2)
    data = SyntheticActivations(d_in=d_in, n_features=4 * d_in, chunk_size=batch, n_chunks=steps + warmup + 1)
    chunks = [c for c in data]
    started = time.perf_counter()
    time_training(d_in, widths[0], 32, batch, 2, 1, chunks)  # warm-up: first-use costs of kernels and allocator

    print(f"memory to train one SAE (fp32 weights, Adam; batch 4096, d_in {d_in}):")
    for d_sae in (16384, 131072, 1048576):
        est = estimate_memory(d_in, d_sae, 4096)
        print(
            f"  d_sae {d_sae:>9,}: {est['total']:6.2f} GiB  (weights {est['weights']:.2f}, grads+Adam {est['grads_and_adam']:.2f}, "
            f"pre-activations {est['preactivations']:.2f})"
        )

    print(
        f"\nTopK training time per token on this CPU ({torch.get_num_threads()} threads, d_in {d_in}, batch {batch}, "
        f"median of {steps} steps):"
    )
    print(f"  {'d_sae':>7} {'k':>4} {'us/token':>9} {'tokens/s':>9} {'GEMM us/token':>14} {'of limit':>9}")
    rows = [(d, 32) for d in widths] + [(widths[1], k) for k in ks if k != 32]
    results = {}
    for d_sae, k in rows:
        step = time_training(d_in, d_sae, k, batch, steps, warmup, chunks)
        gemm = gemm_seconds(batch, d_in, d_sae)
        results[(d_sae, k)] = step
        print(
            f"  {d_sae:>7} {k:>4} {1e6 * step / batch:>9.2f} {batch / step:>9,.0f} {1e6 * gemm / batch:>14.2f} {gemm / step:>8.0%}"
        )
    small, large = widths[0], widths[-1]
    growth = results[(large, 32)] / results[(small, 32)]
    print(
        f"  {large // small}x the latents costs {growth:.1f}x the time per token; "
        f"k {ks[-1]} vs {ks[0]} at d_sae {widths[1]}: {results[(widths[1], ks[-1])] / results[(widths[1], ks[0])]:.2f}x"
    )

    # ---- memory-mapped cache vs RAM
    d_sae, k, big_batch = (1024, 16, 1024) if args.quick else (4608, 32, 4096)
    n_batches = 6
    source = SyntheticActivations(d_in=d_in, n_features=4 * d_in, chunk_size=big_batch, n_chunks=n_batches + 2, seed=3)
    ram_chunks = [c for c in source]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.safetensors"
        raw = torch.cat(ram_chunks)
        save_file(
            {"activations": raw.half().contiguous()},
            str(path),
            metadata={"hook_point": "resid_post.15", "scale_factor": "1.0"},
        )
        from monoscope.data import ActivationCache

        cache = ActivationCache(path)
        cache_times, ram_times = [], []
        for block in range(4):
            for kind in ("cache", "ram"):
                if kind == "cache":
                    timed = Timed(source=cache.batches(big_batch, seed=block), n=n_batches + 1)
                else:
                    timed = Timed(chunks=[c.clone() for c in ram_chunks[: n_batches + 1]])
                cfg = TrainConfig(
                    d_in=d_in,
                    d_sae=d_sae,
                    k=k,
                    batch_size=big_batch,
                    total_tokens=big_batch * n_batches,
                    dead_tokens=10**9,
                )
                with tempfile.TemporaryDirectory() as out:
                    train_sae(cfg, timed, out, progress=False, device="cpu", checkpoint_every_tokens=big_batch * 10**6)
                (cache_times if kind == "cache" else ram_times).extend(timed.step_times(2))

    # Other processes on a shared machine slow random steps down; the lower quartile of each side's step times
    # is what the code itself costs, the median is shown too.
    def quartile(times):
        return statistics.quantiles(times, n=4)[0]

    cache_rate, ram_rate = big_batch / quartile(cache_times), big_batch / quartile(ram_times)
    ratio = cache_rate / ram_rate
    median_ratio = statistics.median(ram_times) / statistics.median(cache_times)
    print(
        f"\ntraining from a memory-mapped fp16 cache vs float32 batches in RAM (d_sae {d_sae}, k {k}, batch {big_batch}, "
        f"{len(cache_times)} steps each, alternating):"
    )
    print(
        f"  cache {cache_rate:,.0f} tok/s, RAM {ram_rate:,.0f} tok/s (lower-quartile step times): {ratio:.2f}x "
        f"(medians: {median_ratio:.2f}x)  target >= 0.90x: {'met' if ratio >= 0.9 else 'NOT met'}"
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
