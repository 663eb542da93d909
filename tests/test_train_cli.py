"""`monoscope train` and `monoscope eval` as scripts call them, on a tiny model's harvest cache."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_cli import run_cli

from monoscope.data import HarvestConfig, harvest_to_cache
from monoscope.sae import load_sae


@pytest.fixture(scope="module")
def cache_dir(tiny_llama_dir, text_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "acts"
    cfg = HarvestConfig(
        model=str(tiny_llama_dir),
        hook_points=["resid_post.1"],
        corpus=str(text_corpus),
        tokens=3000,
        context_size=16,
        batch_size=8,
        shard_tokens=1000,
    )
    harvest_to_cache(cfg, folder, show_progress=False)
    return folder


def test_train_then_eval_contract(cache_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "sae"
    result = run_cli(
        "train",
        "--activations",
        str(cache_dir),
        "--d-sae",
        "64",
        "--k",
        "4",
        "--tokens",
        "6000",
        "--out",
        str(out),
        "--batch-size",
        "256",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 32 and cfg["d_sae"] == 64 and cfg["k"] == 4
    sae = load_sae(out)
    assert sae.info["model"] == str(tiny_llama_dir) and sae.info["hook_name"] == "resid_post.1"
    # The saved SAE takes raw activations: its reconstructions of the cache beat predicting the mean.
    from monoscope.data import ActivationCache

    raw = ActivationCache(cache_dir).read_all(normalize=False)
    fvu = ((raw - sae(raw)) ** 2).sum() / ((raw - raw.mean(0)) ** 2).sum()
    assert fvu < 0.9
    evaluated = run_cli("eval", "--sae", str(out), "--tokens", "200", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    for key in (
        "l0",
        "fvu",
        "explained_variance",
        "ce_loss_score",
        "kl_div_score",
        "delta_loss",
        "frac_alive",
        "shrinkage",
    ):
        assert key in metrics and isinstance(metrics[key], float)
    assert metrics["held_out_from_context"] > 0, "eval text follows the training text"
    assert json.loads((out / "eval.json").read_text()) == metrics
    low, high = metrics["intervals"]["ce_loss_score"]
    assert low <= high and metrics["contexts"] >= 2
    table = run_cli("eval", "--sae", str(out), "--tokens", "200")
    assert table.returncode == 0, table.stderr
    delta_line = next(line for line in table.stdout.splitlines() if "delta loss" in line)
    assert "[" in delta_line and "95% bootstrap interval" in table.stdout  # every figure with its interval


def test_sweep_from_one_pass_and_single_file_activations(cache_dir, tmp_path):
    from safetensors.torch import save_file

    from monoscope.data import ActivationCache

    out = tmp_path / "sweep"
    result = run_cli(
        "train",
        "--activations",
        str(cache_dir),
        "--d-sae",
        "32,64",
        "--k",
        "4",
        "--tokens",
        "2000",
        "--out",
        str(out),
        "--batch-size",
        "256",
    )
    assert result.returncode == 0, result.stderr
    folders = sorted(p.name for p in out.iterdir() if (p / "cfg.json").is_file())
    assert len(folders) == 2 and {json.loads((out / f / "cfg.json").read_text())["d_sae"] for f in folders} == {32, 64}
    acts = ActivationCache(cache_dir).read_all(normalize=False)
    save_file({"activations": acts}, str(tmp_path / "acts.safetensors"))
    single = run_cli(
        "train",
        "--activations",
        str(tmp_path / "acts.safetensors"),
        "--d-sae",
        "64",
        "--k",
        "8",
        "--tokens",
        "1000",
        "--out",
        str(tmp_path / "s"),
        "--batch-size",
        "200",
    )
    assert single.returncode == 0, single.stderr
    assert torch.isfinite(load_sae(tmp_path / "s").W_dec).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--d-sae", "8", "--k", "8"], "k"),
        (["--d-sae", "64", "--model", "x"], "not both"),
        (["--d-sae", "64", "--arch", "relu", "--l1-coefficient", "nan"], "expected a finite number, got nan"),
        (["--d-sae", "64", "--arch", "relu", "--l1-coefficient", "-1"], "finite number >= 0"),
        (["--d-sae", "64", "--l1-coefficient", "3"], "--l1-coefficient is for --arch relu"),
        (
            ["--d-sae", "64", "--arch", "jumprelu", "--k", "64", "--batch-size", "200"],
            "target_l0 must be in (0, d_sae=64)",
        ),
    ],
)
def test_bad_training_input_is_one_line(cache_dir, tmp_path, extra, message):
    result = run_cli("train", "--activations", str(cache_dir), "--tokens", "1000", "--out", str(tmp_path / "o"), *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("monoscope: error:", "monoscope train: error:")) and message in last
