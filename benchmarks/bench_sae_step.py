"""TopK SAE training, time to quality: monoscope vs EleutherAI's sparsify (and the machine's GEMM limit), in one run.

    .venv/bin/python benchmarks/bench_sae_step.py --activations runs/quickstart/activations   # real activations
    .venv/bin/python benchmarks/bench_sae_step.py            # synthetic; d_in 576, d_sae 4608, k 32, batch 4096

1. Activations: with --activations, a harvest cache split by context (a seeded hash, as in
   bench_optimizers.py): training batches come from 80 % of the contexts, held-out FVU is measured on the
   `report` tenth, never trained on. Without it, synthetic activations with realistic structure (sparse
   non-negative combinations of power-law-frequent unit directions + offset + noise, E||x|| = sqrt(d_in);
   `monoscope.sae.synthetic`). Either way they are saved once to a safetensors file both trainers read.
2. The limit: a training step can be no faster than its one forward-encoder GEMM
   ([batch, d_in] @ [d_in, d_sae], 2 * d_in * d_sae FLOPs per token, dense fp32). That GEMM is timed on
   its own before and after, and also right before every training step of both trainers.
3. monoscope: `train_sae` with default settings (TopK, Adam, AuxK, unit-norm decoder, logging); a step is
   the time between two requests for a batch, minus the peer's step and the probe GEMM.
4. sparsify (`eai-sparsify` from PyPI) in its own virtual environment (created on first use at
   --peer-venv by `make peers`: torch, eai-sparsify and sae-lens as pinned in the Makefile), as a subprocess
   on the same activations file: its `SparseCoder` and default optimizer (schedule-free SignSGD, lr
   5e-3 / sqrt(d_sae / 2**14)), with its trainer's per-step work (decoder renormalisation,
   parallel-gradient removal, dead-latent bookkeeping, FVU read back every step).
The two trainers take turns, --block steps each, every step preceded by a probe GEMM: on a shared
machine other processes come and go, and alternating keeps the comparison fair. Reported: tokens/s = batch /
median step time; "of limit" = median over steps of (probe GEMM time / step time).
Both train the same number of steps on the same batches, each with its default optimiser; held-out FVU
(1 - explained variance over the whole held-out set) is computed the same way for both, every --eval-every
steps (outside the timed steps; schedule-free trainers are scored at their averaged weights, without
touching the training state). Reported: FVU after equal steps, and time to quality: the training time
(sum of step times) each trainer needs to first reach a held-out FVU, for sparsify's final FVU and looser
levels. Targets: held-out FVU <= sparsify's at >= 1.5x its tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monoscope.sae import TrainConfig, evaluate_reconstruction, load_train_log, train_sae  # noqa: E402
from monoscope.sae.synthetic import SyntheticActivations  # noqa: E402

PEER_SCRIPT = r"""
# Runs in sparsify's environment. Reads "steps N" / "finish" lines on stdin, answers one JSON line each.
import json, sys, time
import torch
from safetensors.torch import load_file
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

path, d_sae, k, seed, threads, eval_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
data = load_file(path)
train, held_out = data["train"], data["held_out"]
n_batches, batch, d_in = train.shape
torch.manual_seed(seed)
sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), "cpu", dtype=torch.float32)
# sparsify's trainer defaults: optimizer "signum" with this lr rule, auxk_alpha 0, dead threshold 10M tokens
lr = 5e-3 / (sae.num_latents / (2**14)) ** 0.5
opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
opt.train()
tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
did_fire = torch.zeros(d_sae, dtype=torch.bool)
probe_x, probe_w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
print(json.dumps({"ready": True}), flush=True)
step = 0
curve = []


@torch.no_grad()
def held_out_fvu():
    # the averaged weights x = lerp(y, z, 1 - 1/momentum), computed on a copy: training state untouched
    saved = [p.detach().clone() for p in sae.parameters()]
    for p in sae.parameters():
        z = opt.state[p].get("z")
        if z is not None:
            p.lerp_(z, 1 - 1 / 0.95)
    x_hat = torch.cat([sae(x=chunk).sae_out for chunk in held_out.split(4096)])
    for p, value in zip(sae.parameters(), saved):
        p.copy_(value)
    err = (held_out.double() - x_hat.double()).pow(2).sum(1).mean()
    var = held_out.double().pow(2).sum(1).mean() - held_out.double().mean(0).pow(2).sum()
    return float(err / var)


def one_step():
    global step
    x = train[step % n_batches]
    start = time.perf_counter()
    probe_x @ probe_w
    gemm_s = time.perf_counter() - start
    start = time.perf_counter()
    # what sparsify's Trainer does for each batch (loss_fn "fvu", one hook point)
    if step == 0:
        sae.b_dec.data = x.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    total_variance = (x - x.mean(0)).pow(2).sum()
    out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
    did_fire[out.latent_indices.flatten()] = True
    loss = out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8
    loss.backward()
    float(out.fvu.detach())  # the trainer logs it every step
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        tokens_since_fired.add_(x.shape[0])
        tokens_since_fired[did_fire] = 0
        did_fire.zero_()
    step_s = time.perf_counter() - start
    step += 1
    if step % eval_every == 0:
        curve.append((step, held_out_fvu()))
    return step_s, gemm_s


for line in sys.stdin:
    if line.strip() == "finish":
        break
    timings = [one_step() for _ in range(int(line.split()[1]))]
    print(json.dumps({"step_s": [t[0] for t in timings], "gemm_s": [t[1] for t in timings]}), flush=True)
if not curve or curve[-1][0] != step:
    curve.append((step, held_out_fvu()))
print(json.dumps({"fvu": curve[-1][1], "curve": curve, "lr": lr, "steps": step}), flush=True)
"""


def measure_gemm(batch: int, d_in: int, d_sae: int, repeats: int = 10) -> float:
    """Dense fp32 GFLOP/s of the encoder's forward GEMM shape (best of `repeats`)."""
    x = torch.randn(batch, d_in)
    w = torch.randn(d_in, d_sae)
    for _ in range(3):
        x @ w
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
    return 2 * batch * d_in * d_sae / best / 1e9


def make_activations(path: Path, d_in: int, batch: int, pool: int, held_out_tokens: int, seed: int) -> None:
    source = SyntheticActivations(
        d_in=d_in, n_features=4 * 4096, active_per_token=24, chunk_size=batch, n_chunks=pool, seed=seed
    )
    train = torch.stack([source.chunk(i) for i in range(pool)])
    held_out = source.sample(10_000_019, held_out_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"train": train.contiguous(), "held_out": held_out.contiguous()}, str(path))


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python; built by `make peers` (the Makefile holds the venv's package list)."""
    python = venv / "bin" / "python"

    def works() -> bool:
        probe = [str(python), "-c", "import sparsify, schedulefree"]
        return python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0

    if not works():
        print(f"creating {venv} with `make peers` (once)...", file=sys.stderr)
        subprocess.run(["make", "-C", str(REPO), "peers", f"PEER_VENV={venv.resolve()}"], check=True)
        if not works():
            sys.exit(f"{venv} has no working sparsify; see the `make peers` output above, or pass --skip-peer")
    return python


class Peer:
    """sparsify in its own environment, stepping when told to, so both trainers see the same machine."""

    def __init__(self, python: Path, data_path: Path, d_sae: int, k: int, seed: int, eval_every: int) -> None:
        env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}
        self.process = subprocess.Popen(
            [
                str(python),
                "-c",
                PEER_SCRIPT,
                str(data_path),
                str(d_sae),
                str(k),
                str(seed),
                str(torch.get_num_threads()),
                str(eval_every),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.step_s: list[float] = []
        self.gemm_s: list[float] = []
        self._read()  # wait until it has loaded

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline() if self.process.stdout else ""
            if not line:
                error = self.process.stderr.read() if self.process.stderr else ""
                sys.exit(f"the sparsify run failed:\n{error[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def _send(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def steps(self, n: int) -> None:
        reply = self._send(f"steps {n}")
        self.step_s.extend(reply["step_s"])
        self.gemm_s.extend(reply["gemm_s"])

    def finish(self) -> dict:
        reply = self._send("finish")
        self.process.wait()
        return reply


class TimedBatches:
    """Serves the pool's batches in order, timing each monoscope step and a GEMM probe just before it.

    A monoscope step runs between two requests for a batch. Every `block` steps the peer (if any) runs
    its next `block` steps; before each step of either trainer a forward-encoder-sized GEMM is timed. The
    trainers alternate in blocks, not single steps: an idle OpenMP pool keeps spinning for a while after
    its last parallel region, which would slow whichever process runs next.
    """

    def __init__(self, train: torch.Tensor, steps: int, d_sae: int, peer: Peer | None, block: int) -> None:
        self.train, self.steps, self.peer, self.block = train, steps, peer, block
        self.probe_x, self.probe_w = torch.randn(train.shape[1], train.shape[2]), torch.randn(train.shape[2], d_sae)
        self.step_s: list[float] = []
        self.gemm_s: list[float] = []

    def __iter__(self):
        for step in range(self.steps):
            if step:
                self.step_s.append(time.perf_counter() - self.started)
            if self.peer is not None and step % self.block == 0:
                self.peer.steps(min(self.block, self.steps - step))
            start = time.perf_counter()
            self.probe_x @ self.probe_w
            self.started = time.perf_counter()
            self.gemm_s.append(self.started - start)
            yield self.train[step % self.train.shape[0]]


def summarise(step_s: list[float], gemm_s: list[float], batch: int) -> dict:
    """Throughput from the median step, the paired limit, and the median per-step fraction of it."""
    pairs = list(zip(step_s, gemm_s))
    ratios = sorted(g / s for s, g in pairs)
    steps = sorted(step_s)
    gemms = sorted(gemm_s)
    return {
        "tokens_per_s": batch / steps[len(steps) // 2],
        "tokens_per_s_mean": batch * len(steps) / sum(steps),
        "limit_tokens_per_s": batch / gemms[len(gemms) // 2],
        "fraction_of_limit": ratios[len(ratios) // 2],
    }


def real_activations(path: Path, cache: Path, batch: int, pool: int, held_out_tokens: int, seed: int) -> None:
    """Training pool and held-out set from a harvest cache split by context (see bench_optimizers.py)."""
    from bench_optimizers import split_by_context
    from monoscope.data import ActivationCache

    data = split_by_context(ActivationCache(cache), seed)
    train = data["train"][torch.randperm(data["train"].shape[0], generator=torch.Generator().manual_seed(seed))]
    pool = min(pool, train.shape[0] // batch)
    held_out = data["report"][:held_out_tokens]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"train": train[: pool * batch].reshape(pool, batch, -1).contiguous(), "held_out": held_out.contiguous()},
        str(path),
    )


def training_seconds(step_s: list[float], eval_steps: set[int]) -> list[float]:
    """Cumulative training time after each step; steps that also evaluated count as the median step."""
    plain = sorted(t for i, t in enumerate(step_s, start=1) if i not in eval_steps)
    median = plain[len(plain) // 2] if plain else 0.0
    total, out = 0.0, []
    for i, t in enumerate(step_s, start=1):
        total += median if i in eval_steps else t
        out.append(total)
    return out


def time_to(curve: list[tuple[int, float]], cumulative: list[float], level: float) -> float | None:
    """Training seconds until the held-out FVU first reaches `level` (None if it never does)."""
    for step, fvu in curve:
        if fvu <= level:
            return cumulative[min(step, len(cumulative)) - 1]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--activations", type=Path, default=None, help="a harvest cache (default: synthetic activations)"
    )
    parser.add_argument("--d-in", type=int, default=576, help="synthetic activations only")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=86, help="training steps for each trainer")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the speed figures")
    parser.add_argument("--eval-every", type=int, default=5, help="held-out FVU every this many steps")
    parser.add_argument("--pool", type=int, default=86, help="distinct training batches (reused cyclically)")
    parser.add_argument("--held-out", type=int, default=16384, help="held-out tokens for FVU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "bench-sae")
    parser.add_argument("--peer-venv", type=Path, default=REPO / "build" / "peer-venv")
    parser.add_argument("--skip-peer", action="store_true", help="do not run sparsify")
    parser.add_argument("--block", type=int, default=10, help="steps each trainer runs before the other takes over")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for everything timed (default: torch's default). On a machine shared "
        "with other work, 1 thread gives steadier figures: a multi-threaded step waits for "
        "its slowest thread at every operation",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.activations is not None:
        data_path = (
            args.workdir
            / f"real-{args.activations.resolve().name}-{args.batch}-{args.pool}-{args.held_out}-{args.seed}.safetensors"
        )
        if not data_path.exists():
            real_activations(data_path, args.activations, args.batch, args.pool, args.held_out, args.seed)
    else:
        data_path = (
            args.workdir / f"activations-{args.d_in}-{args.batch}-{args.pool}-{args.held_out}-{args.seed}.safetensors"
        )
        if not data_path.exists():
            print("generating synthetic activations...", file=sys.stderr)
            make_activations(data_path, args.d_in, args.batch, args.pool, args.held_out, args.seed)
    data = load_file(str(data_path))
    train, held_out = data["train"], data["held_out"]
    d_in = train.shape[-1]
    print(
        f"activations ({args.activations or 'synthetic'}): {tuple(train.shape)} training pool, {held_out.shape[0]} held-out tokens, "
        f"mean norm {float(held_out.norm(dim=1).mean()):.2f} (sqrt(d_in) = {d_in**0.5:.2f}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    flops_per_token = 2 * d_in * args.d_sae
    gflops_before = measure_gemm(args.batch, d_in, args.d_sae)

    peer = None
    if not args.skip_peer:
        peer = Peer(ensure_peer_venv(args.peer_venv), data_path, args.d_sae, args.k, args.seed, args.eval_every)
    cfg = TrainConfig(
        d_in=d_in,
        d_sae=args.d_sae,
        k=args.k,
        batch_size=args.batch,
        total_tokens=args.steps * args.batch,
        seed=args.seed,
    )
    batches = TimedBatches(train, args.steps, args.d_sae, peer, args.block)
    with tempfile.TemporaryDirectory() as out:
        result = train_sae(
            cfg,
            batches,
            out,
            device="cpu",
            progress=False,
            checkpoint_every_tokens=10 * cfg.total_tokens,
            held_out=held_out,
            eval_every_tokens=args.eval_every * args.batch,
        )
        log = load_train_log(out)
    ours_curve = [(row["step"], row["held_out_fvu"]) for row in log if "held_out_fvu" in row]
    ours_fvu = evaluate_reconstruction(result.sae, held_out.split(4096)).fvu
    eval_steps = {step for step, _ in ours_curve}
    ours = summarise(
        [t for i, t in enumerate(batches.step_s, 1) if i > args.warmup and i not in eval_steps],
        [g for i, g in enumerate(batches.gemm_s[: len(batches.step_s)], 1) if i > args.warmup and i not in eval_steps],
        args.batch,
    )
    ours_seconds = training_seconds(batches.step_s, eval_steps)
    ours_seconds.append(ours_seconds[-1] + (ours_seconds[-1] / max(1, len(ours_seconds))))  # the last step is not timed
    peer_stats = None
    if peer is not None:
        reply = peer.finish()
        peer_curve = [tuple(point) for point in reply["curve"]]
        peer_stats = {
            **summarise(peer.step_s[args.warmup :], peer.gemm_s[args.warmup :], args.batch),
            "fvu": reply["fvu"],
            "curve": peer_curve,
            "seconds": training_seconds(peer.step_s, set()),
        }

    gflops_after = measure_gemm(args.batch, d_in, args.d_sae)
    best_limit = max(gflops_before, gflops_after) * 1e9 / flops_per_token

    print(
        f"\nTopK SAE training, d_in={d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}: {args.steps} steps each on the "
        f"same batches, each trainer's default optimiser ({cfg.optim.name} for monoscope, signum for sparsify); "
        f"median step times (steps {args.warmup + 1}+, evaluation steps left out)"
    )
    print(
        f"  dense fp32 GEMM of the encoder's shape: {gflops_before:.1f} GFLOP/s before, {gflops_after:.1f} after "
        f"-> limit {best_limit:,.0f} tokens/s"
    )
    print(f"  {'':24}{'tokens/s':>10}  {'limit tok/s*':>12}  {'of limit*':>9}  {'held-out FVU':>12}")
    rows = [("monoscope", ours, ours_fvu)]
    if peer_stats is not None:
        rows.append((f"sparsify {_peer_version(args.peer_venv)}", peer_stats, peer_stats["fvu"]))
    for name, stats, fvu in rows:
        print(
            f"  {name:<24}{stats['tokens_per_s']:>10,.0f}  {stats['limit_tokens_per_s']:>12,.0f}  "
            f"{stats['fraction_of_limit']:>9.0%}  {fvu:>12.4f}"
        )
    print("  * limit: one forward-encoder GEMM per step, timed just before each step (same conditions);")
    print("    'of limit' is the median over steps of GEMM time / step time")
    summary = {
        "ours_optimizer": cfg.optim.to_dict(),
        "ours_tokens_per_s": ours["tokens_per_s"],
        "ours_limit_tokens_per_s": ours["limit_tokens_per_s"],
        "ours_fraction_of_limit": ours["fraction_of_limit"],
        "ours_fvu": ours_fvu,
        "ours_curve": ours_curve,
        "standalone_limit_tokens_per_s": best_limit,
    }
    if peer_stats is not None:
        speedup = ours["tokens_per_s"] / peer_stats["tokens_per_s"]
        paired = ours["fraction_of_limit"] / peer_stats["fraction_of_limit"]
        print(
            f"  speed-up over sparsify: {speedup:.2f}x in tokens/s ({paired:.2f}x in fraction of the paired limit); "
            f"held-out FVU after {args.steps} steps {ours_fvu:.4f} vs {peer_stats['fvu']:.4f} "
            f"({'<=' if ours_fvu <= peer_stats['fvu'] else '>'} sparsify's)"
        )
        print(
            "\n  time to quality (training seconds until the held-out FVU first reaches the level; evaluated every "
            f"{args.eval_every} steps):"
        )
        print(f"  {'held-out FVU <=':>18}{'monoscope':>12}{'sparsify':>12}{'sparsify / monoscope':>22}")
        levels = [peer_stats["fvu"] * factor for factor in (1.0, 1.1, 1.25, 1.5)]
        times = []
        for level in levels:
            ours_t, peer_t = (
                time_to(ours_curve, ours_seconds, level),
                time_to(peer_stats["curve"], peer_stats["seconds"], level),
            )
            times.append({"fvu": level, "monoscope_s": ours_t, "sparsify_s": peer_t})
            ratio = f"{peer_t / ours_t:.2f}x" if ours_t and peer_t else "-"
            fmt = lambda t: f"{t:.1f} s" if t is not None else "never"  # noqa: E731
            print(f"  {level:>18.4f}{fmt(ours_t):>12}{fmt(peer_t):>12}{ratio:>22}")
        summary.update(
            {
                "sparsify_tokens_per_s": peer_stats["tokens_per_s"],
                "sparsify_fraction_of_limit": peer_stats["fraction_of_limit"],
                "sparsify_fvu": peer_stats["fvu"],
                "sparsify_curve": peer_stats["curve"],
                "speedup": speedup,
                "speedup_vs_paired_limit": paired,
                "time_to_quality": times,
            }
        )
    print(json.dumps(summary))


def _peer_version(venv: Path) -> str:
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('eai-sparsify'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() or "?"


if __name__ == "__main__":
    main()
