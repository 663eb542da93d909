"""Training memory: `estimate_memory` against the measured peak, per architecture and option, in one run.

    .venv/bin/python benchmarks/bench_memory.py               # d_in 512, d_sae 16384, batch 2048 (CPU)

Each case runs in its own subprocess: it imports everything and builds the batches, records its peak
resident memory (VmHWM, reset just before), trains a few steps with monoscope's trainer, and reports the growth of the peak
over all but the last step (read when the last batch is asked for, so saving the SAE is not counted).
That growth is what `estimate_memory` estimates (weights, gradients, optimiser state, one step's activations);
the table prints both and their ratio. The AuxK case makes most latents dead (a small batch, few firings a
step, dead after one batch) so its dense copy is as large as it gets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from monoscope.sae import TrainConfig  # noqa: E402
from monoscope.sae.distributed import estimate_config_memory  # noqa: E402
from peak_memory import run_case  # noqa: E402

CASE = r"""
import json, sys, tempfile
import torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[3])
from monoscope.sae import TrainConfig, train_sae
spec = json.loads(sys.argv[2])

from peak_memory import peak_kib, reset_peak
torch.manual_seed(0)
batches = [torch.randn(spec["batch"], spec["d_in"]) for _ in range(spec["steps"])]
# first-use costs (optimiser imports, kernels) before the baseline: a tiny run of the same kind
with tempfile.TemporaryDirectory() as out:
    small = TrainConfig(d_in=spec["d_in"], d_sae=64, k=4, batch_size=16, total_tokens=32, architecture=spec["arch"],
                        optimizer={"name": spec["optimizer"]})
    train_sae(small, [torch.randn(16, spec["d_in"])] * 2, out, progress=False, device="cpu")
base = reset_peak()
cfg = TrainConfig(d_in=spec["d_in"], d_sae=spec["d_sae"], k=spec["k"], batch_size=spec["batch"], total_tokens=spec["batch"] * spec["steps"],
                  architecture=spec["arch"], optimizer={"name": spec["optimizer"]}, multi_topk=spec["multi_topk"],
                  aux_coefficient=spec["aux"], dead_tokens=spec["batch"], **({"target_l0": float(spec["k"])} if spec["arch"] == "jumprelu" else {}))
peaks = []


def stream():
    for batch in batches:  # the peak so far is read when the next batch is asked for: the steps, not the final save
        peaks.append(peak_kib())
        yield batch


with tempfile.TemporaryDirectory() as out:
    train_sae(cfg, stream(), out, progress=False, device="cpu", checkpoint_every_tokens=10**12)
peak = peaks[-1]
print(json.dumps({"measured_gib": (peak - base) / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base = {
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "batch": args.batch,
        "k": args.k,
        "steps": args.steps,
        "optimizer": "adam",
        "multi_topk": False,
        "aux": 1 / 32,
        "arch": "topk",
    }
    cases = [
        ("topk, adam", {}),
        ("topk, signum", {"optimizer": "signum"}),
        ("topk, adam_sf", {"optimizer": "adam_sf"}),
        ("topk, AuxK with most latents dead", {"batch": max(64, args.d_sae // 16), "k": 4}),
        ("topk, multi-topk", {"multi_topk": True}),
        ("batchtopk", {"arch": "batchtopk"}),
        ("jumprelu", {"arch": "jumprelu"}),
        ("relu", {"arch": "relu"}),
    ]
    print(
        f"peak resident memory growth while training, d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, k {args.k}, "
        f"{args.steps} steps (CPU, fp32):"
    )
    print(f"  {'case':<36}{'measured GiB':>13}{'estimate GiB':>13}{'estimate/measured':>19}")
    ratios = []
    for label, change in cases:
        spec = {**base, **change}
        row = run_case(CASE, spec, label)
        if row is None:
            continue
        measured = row["measured_gib"]
        cfg = TrainConfig(
            d_in=spec["d_in"],
            d_sae=spec["d_sae"],
            k=spec["k"],
            batch_size=spec["batch"],
            total_tokens=spec["batch"] * spec["steps"],
            architecture=spec["arch"],
            optimizer={"name": spec["optimizer"]},
            multi_topk=spec["multi_topk"],
            aux_coefficient=spec["aux"],
        )
        terms_gib = estimate_config_memory(cfg)
        estimate = terms_gib["total"]
        ratios.append(estimate / measured)
        terms = ", ".join(f"{k} {v:.3f}" for k, v in terms_gib.items() if k not in ("total", "grads_and_adam"))
        print(f"  {label:<36}{measured:>13.3f}{estimate:>13.3f}{estimate / measured:>19.2f}   ({terms})")
    if ratios:
        print(f"estimate / measured: {min(ratios):.2f} to {max(ratios):.2f}")


if __name__ == "__main__":
    main()
