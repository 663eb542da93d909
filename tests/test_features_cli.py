"""`monoscope analyze`, `features search|show` and `scan` as users call them: real subprocesses, JSON output,
exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from monoscope.sae import SAEConfig, TopKSAE, save_sae


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monoscope", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_llama_dir, text_corpus, tokenizer):
    """A TopK SAE on the tiny Llama's embeddings whose latent 0 fires on the token 'az' only."""
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=32, d_sae=32, architecture="topk", k=3))
    with torch.no_grad():
        w = torch.randn(32, 32, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(w.T / emb.norm(dim=1).mean())
        e = emb[tokenizer.convert_tokens_to_ids("az")]
        sae.W_enc[:, 0] = e / e.dot(e) * 10.0
        sae.b_enc.zero_()
        sae.b_enc[0] = -5.0
    folder = tmp_path_factory.mktemp("cli-sae")
    save_sae(
        sae,
        folder,
        info={
            "model": str(tiny_llama_dir),
            "hook_point": "resid_pre.0",
            "context_size": 16,
            "corpus": {"spec": str(text_corpus)},
        },
    )
    return folder


@pytest.mark.parametrize("command", [["analyze"], ["features"], ["features", "search"], ["features", "show"], ["scan"]])
def test_help_exits_zero(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: monoscope" in result.stdout


@pytest.fixture(scope="module")
def analysed(sae_dir):
    result = run_cli("analyze", "--sae", sae_dir, "--tokens", "1200", "--no-embeddings", "--map", "pca", "--json")
    assert result.returncode == 0, result.stderr
    return sae_dir, json.loads(result.stdout)


def test_analyze_search_show_scan(analysed):
    sae_dir, summary = analysed
    assert summary["db"] == str(sae_dir / "features.db") and summary["n_features"] == 32 and summary["tokens"] >= 1200

    found = run_cli("features", "search", "--sae", sae_dir, "az", "--mode", "words", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["results"]
    assert hits[0]["feature_id"] == 0 and "'az'" in hits[0]["label"]
    assert hits[0]["label_score"] is None  # analysed --no-embeddings: no label scores

    shown = run_cli("features", "show", "--sae", sae_dir, "0", "--json")
    assert shown.returncode == 0, shown.stderr
    feature = json.loads(shown.stdout)
    assert feature["id"] == 0 and feature["density"] > 0 and len(feature["neighbours"]) == 10
    assert "label_score" in feature and feature["label_score"] is None
    assert len(feature["logit_effects"]["up"]) == 10 and sum(feature["histogram"]["counts"]) == feature["n_active"]
    top = feature["examples"]["top"]
    assert top and all(e["tokens"][e["peak"]] == "az" for e in top)

    text = run_cli("features", "show", "--sae", sae_dir, "0")  # the terminal dashboard, without a TTY: brackets
    assert text.returncode == 0 and "[az]" in text.stdout and "nearest features" in text.stdout

    scanned = run_cli("scan", "--sae", sae_dir, "the lazy dog", "--json")
    assert scanned.returncode == 0, scanned.stderr
    scan = json.loads(scanned.stdout)
    az = [t for t in scan["tokens"] if t["token"] == "az"]
    assert az and az[0]["features"][0]["id"] == 0 and az[0]["features"][0]["label"]

    by_example = run_cli(
        "features", "search", "--sae", sae_dir, "--example", "so lazy", "--example", "lazy cat", "--json"
    )
    assert by_example.returncode == 0, by_example.stderr
    assert json.loads(by_example.stdout)["results"][0]["feature_id"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["features", "show", "--sae", "{sae}", "999"], "feature 999 does not exist: this SAE has 32 features"),
        (["features", "search", "--sae", "{empty}", "words"], "run `monoscope analyze --sae"),
        (["features", "search", "--sae", "{sae}"], "give words to search for"),
    ],
)
def test_bad_input_gives_one_line_error(analysed, tmp_path, args, message):
    sae_dir, _ = analysed
    result = run_cli(*[a.format(sae=sae_dir, empty=tmp_path) for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("monoscope: error:") and message in lines[-1]
