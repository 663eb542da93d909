"""`monoscope features family`: a feature's closest features in other SAEs of the same hook point, by decoder
cosine and (with a feature database) by co-activation on the analysed tokens."""

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


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def family_saes(tmp_path_factory, tiny_llama_dir, text_corpus, tokenizer):
    """A narrow SAE (8 latents; latent 0 fires on 'az') and a wide one (16 latents) in which each narrow
    latent i split into 2i and 2i+1 (decoders near it), plus latent 15 that fires on 'az' like latent 0 but
    writes an unrelated direction (found only by co-activation)."""
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(1)
    e = emb[tokenizer.convert_tokens_to_ids("az")]
    scale = emb.norm(dim=1).mean()

    narrow = TopKSAE(SAEConfig(d_in=32, d_sae=8, architecture="topk", k=2))
    wide = TopKSAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2))
    with torch.no_grad():
        base = _unit(torch.randn(8, 32, generator=g))
        narrow.W_dec.copy_(base)
        narrow.W_enc.copy_(base.T / scale)
        narrow.W_enc[:, 0] = e / e.dot(e) * 10.0
        narrow.b_enc.zero_()
        narrow.b_enc[0] = -5.0
        split = _unit(base.repeat_interleave(2, 0) + 0.3 * torch.randn(16, 32, generator=g))
        split[15] = _unit(torch.randn(32, generator=g))
        wide.W_dec.copy_(split)
        wide.W_enc.copy_(split.T / scale)
        wide.W_enc[:, 15] = e / e.dot(e) * 10.0
        wide.b_enc.zero_()
        wide.b_enc[15] = -5.0
    info = {
        "model": str(tiny_llama_dir),
        "hook_point": "resid_pre.0",
        "context_size": 16,
        "corpus": {"spec": str(text_corpus)},
    }
    folders = []
    for name, sae in (("narrow", narrow), ("wide", wide)):
        folder = tmp_path_factory.mktemp(f"family-{name}")
        save_sae(sae, folder, info=info)
        folders.append(folder)
    return folders


def test_family_by_decoder_cosine_finds_the_split(family_saes):
    narrow, wide = family_saes
    result = run_cli(
        "features", "family", "--sae", narrow, "--across", wide, "3", "--top", "3", "--no-coactivation", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["feature"] == 3 and out["sae"] == str(narrow) and len(out["across"]) == 1
    part = out["across"][0]
    assert part["sae"] == str(wide)
    cosines = [m["cosine"] for m in part["matches"]]
    assert cosines == sorted(cosines, reverse=True)
    assert {m["feature"] for m in part["matches"][:2]} == {6, 7}
    assert all(m["coactivation"] is None for m in part["matches"])


def test_family_coactivation_finds_a_feature_with_another_direction(family_saes):
    narrow, wide = family_saes
    analysed = run_cli("analyze", "--sae", narrow, "--tokens", "1200", "--no-embeddings", "--map", "none", "--json")
    assert analysed.returncode == 0, analysed.stderr
    result = run_cli(
        "features", "family", "--sae", narrow, "--across", wide, "--across", narrow, "0", "--top", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["coactivation_tokens"] > 0
    wide_part = out["across"][0]
    by_id = {m["feature"]: m for m in wide_part["matches"]}
    assert 15 in by_id, "latent 15 fires on the same tokens: co-activation must bring it in"
    assert by_id[15]["coactivation"] > 0.9 and abs(by_id[15]["cosine"]) < 0.9
    assert {0, 1} <= set(by_id)  # the decoder split is there too
    self_part = out["across"][1]  # the SAE against itself: the feature is its own best match
    assert self_part["matches"][0]["feature"] == 0 and self_part["matches"][0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert self_part["matches"][0]["coactivation"] == pytest.approx(1.0, abs=1e-4)

    text = run_cli("features", "family", "--sae", narrow, "--across", wide, "0")
    assert text.returncode == 0 and "#15" in text.stdout and "co-activation: Pearson r" in text.stdout


def test_family_bad_input(family_saes, tmp_path, capsys):
    from monoscope.cli import main

    narrow, wide = family_saes
    other = TopKSAE(SAEConfig(d_in=24, d_sae=8, architecture="topk", k=2))
    save_sae(other, tmp_path / "other", info={"hook_point": "resid_pre.0"})
    cases = [
        (["--sae", narrow, "--across", tmp_path / "other", "0"], "d_in=24"),
        (["--sae", narrow, "--across", wide, "99"], "does not exist"),
        (["--sae", narrow, "--across", tmp_path / "missing", "0"], "does not exist"),
    ]
    for args, message in [*cases, (["--sae", narrow, "0"], "--across")]:
        try:
            code = main(["features", "family", *map(str, args), "--no-coactivation"])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
