"""Data-parallel and spread training with torchrun: 2 CPU processes (gloo on 127.0.0.1), a small synthetic source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from monoscope.sae import evaluate_reconstruction, load_sae, load_train_log
from monoscope.sae.distributed import ShardedSource, partition, shard_source

WORKER = r"""
import os, sys, torch
from safetensors.torch import save_file
from monoscope.sae import TrainConfig
from monoscope.sae.distributed import train_distributed
from monoscope.sae.synthetic import SyntheticActivations

torch.set_num_threads(1)
out, mode, fail_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = SyntheticActivations(d_in=16, n_features=96, active_per_token=4, chunk_size=256, n_chunks=40, seed=1)

class Failing:
    def iter_from(self, index):
        for i, chunk in enumerate(data.iter_from(index), start=index):
            if i == fail_at:
                raise RuntimeError("disk went away")
            yield chunk
    def __iter__(self):
        return self.iter_from(0)

def cfg(**kw):
    return TrainConfig(d_in=16, total_tokens=256 * 30, **{"d_sae": 64, "k": 4, "batch_size": 256, "seed": 0, **kw})

if mode == "spread":
    configs = {"a": cfg(), "b": cfg(k=6), "c": cfg(d_sae=48)}
    keyed = [{"": chunk} for chunk in data]  # several SAEs read a {hook name: tensor} stream
    results = train_distributed(configs, keyed, out, mode="spread", progress=False, checkpoint_every_tokens=256 * 10)
else:
    source = Failing() if fail_at >= 0 else data
    try:
        if mode == "jumprelu":
            config = cfg(architecture="jumprelu", target_l0=4.0)
        elif mode == "signum":  # schedule-free: its z and averaging counters must stay equal on every rank and resume
            config = cfg(optimizer={"name": "signum"})
        else:
            config = cfg()
        results = train_distributed({"sae": config}, source, out, single=True, progress=False, checkpoint_every_tokens=256 * 10)
    except RuntimeError as err:
        print("FAILED", err)
        sys.exit(3)
rank = os.environ.get("RANK", "0")
for name, result in results.items():
    save_file({k: v.contiguous() for k, v in result.sae.weights().items()}, os.path.join(out, f"weights-{name}-rank{rank}.safetensors"))
"""


def _run(
    tmp_path: Path, out: Path, mode: str = "data", nproc: int = 2, fail_at: int = -1
) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out), mode, str(fail_at)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(script),
            str(out),
            mode,
            str(fail_at),
        ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _held_out():
    from monoscope.sae.synthetic import SyntheticActivations

    data = SyntheticActivations(d_in=16, n_features=96, active_per_token=4, chunk_size=256, n_chunks=40, seed=1)
    return [data.sample(10_000 + i, 1024) for i in range(2)]


def test_shard_rows_union_is_the_batch():
    chunks = [
        torch.arange(i * 50, i * 50 + 10, dtype=torch.float32).repeat(3, 1).T.contiguous() for i in range(3)
    ]  # [10, 3]
    shards = [list(ShardedSource(chunks, r, 3).iter_from(1)) for r in range(3)]
    assert all(s[0].shape == (3, 3) for s in shards)  # 10 // 3 rows each, the 10th row dropped
    assert torch.equal(torch.cat([s[0] for s in shards]), chunks[1][:9])
    assert shard_source(chunks, 0, 1) is chunks
    assert partition(["c", "a", "b"], 0, 2) == ["a", "c"] and partition(["c", "a", "b"], 1, 2) == ["b"]


def test_data_parallel_matches_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert _run(tmp_path, single, nproc=1).returncode == 0
    proc = _run(tmp_path, multi)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = load_file(multi / "weights-sae-rank0.safetensors")
    w1 = load_file(multi / "weights-sae-rank1.safetensors")
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name  # every rank took the same steps
    saved = load_sae(multi)
    assert torch.equal(saved.W_dec.detach(), w0["W_dec"])  # rank 0 wrote the SAE
    assert not (multi / "checkpoints").exists()
    log = load_train_log(multi)
    assert [r["step"] for r in log] == list(range(1, 31)) and log[-1]["tokens"] == 30 * 256  # one log, global tokens
    assert log[-1]["fvu"] < 0.7 * log[0]["fvu"]
    held = _held_out()
    fvu_multi = evaluate_reconstruction(saved, held).fvu
    fvu_single = evaluate_reconstruction(load_sae(single), held).fvu
    assert abs(fvu_multi - fvu_single) < 0.05 + 0.1 * fvu_single, (fvu_multi, fvu_single)
    info = json.loads((multi / "monoscope.json").read_text())
    assert info["training"]["tokens"] == 30 * 256 and info["training"]["complete"]


def test_data_parallel_jumprelu_with_a_target_l0_keeps_ranks_identical(tmp_path):
    # Each rank sees its own rows, so its own batch L0: the threshold controller must act on the global one.
    out = tmp_path / "jumprelu"
    proc = _run(tmp_path, out, mode="jumprelu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = load_file(out / "weights-sae-rank0.safetensors")
    w1 = load_file(out / "weights-sae-rank1.safetensors")
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    saved = load_sae(out)
    assert saved.cfg.architecture == "jumprelu"
    assert 4 * 0.6 < evaluate_reconstruction(saved, _held_out()).l0 < 4 * 1.6


def test_data_parallel_resume_equals_uninterrupted(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _run(tmp_path, whole, mode="signum").returncode == 0
    failed = _run(tmp_path, resumed, mode="signum", fail_at=17)
    assert failed.returncode != 0 and (resumed / "checkpoints").is_dir()
    proc = _run(tmp_path, resumed, mode="signum")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_sae(whole), load_sae(resumed)
    assert load_sae(whole).info["training"]["config"]["optimizer"]["name"] == "signum"
    for name, tensor in a.weights().items():
        torch.testing.assert_close(b.weights()[name], tensor, rtol=1e-5, atol=1e-6)
    rank0, rank1 = (load_file(str(resumed / f"weights-sae-rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # the ranks' averaged weights agree exactly


def test_spread_over_ranks(tmp_path):
    out = tmp_path / "spread"
    proc = _run(tmp_path, out, mode="spread")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("weights-*")) == [
        "weights-a-rank0.safetensors",
        "weights-b-rank1.safetensors",
        "weights-c-rank0.safetensors",
    ]
    for name, k in (("a", 4), ("b", 6), ("c", 4)):
        assert load_sae(out / name).cfg.k == k
