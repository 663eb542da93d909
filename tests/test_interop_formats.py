"""Loading SAEs written by SAELens, sparsify, Gemma Scope and the hub; references are written here in numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from monoscope.errors import MonoscopeError
from monoscope.sae import load_sae
from monoscope.sae.interop import check_model_match, foreign_format
from monoscope.sae.loader import load_any_sae

D_IN, D_SAE, K = 12, 40, 5
RNG = np.random.default_rng(0)


def _f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _x(n=64):
    return _f32(n, D_IN, scale=2.0)


def _topk_ref(pre, k):
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, idx] = np.maximum(pre[rows, idx], 0)
    return out


def _close(codes, ref, x_hat=None, ref_hat=None):
    np.testing.assert_allclose(codes.detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    if x_hat is not None:
        np.testing.assert_allclose(x_hat.detach().numpy(), ref_hat, rtol=1e-4, atol=1e-4)


def _saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    base = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"},
    }
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def _base_weights():
    return {
        "W_enc": _f32(D_IN, D_SAE),
        "W_dec": _f32(D_SAE, D_IN),
        "b_enc": _f32(D_SAE, scale=0.1),
        "b_dec": _f32(D_IN, scale=0.1),
    }


def test_saelens_standard_topk_jumprelu(tmp_path):
    x = _x()
    w = _base_weights()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    # standard
    sae = load_sae(_saelens(tmp_path / "std", {"architecture": "standard"}, w))
    ref = np.maximum(pre, 0)
    _close(sae.encode(torch.from_numpy(x)), ref, sae(torch.from_numpy(x)), ref @ w["W_dec"] + w["b_dec"])
    sae = load_any_sae(tmp_path / "std")  # native folders: load_sae's result, with the hook point mapped
    assert sae.info["hook_point"] == "resid_post.3" and sae.info["model"] == "gpt2"
    # topk
    sae = load_sae(_saelens(tmp_path / "topk", {"architecture": "topk", "k": K}, w))
    ref = _topk_ref(pre, K)
    _close(sae.encode(torch.from_numpy(x)), ref, sae(torch.from_numpy(x)), ref @ w["W_dec"] + w["b_dec"])
    # jumprelu
    theta = np.abs(_f32(D_SAE))
    sae = load_sae(_saelens(tmp_path / "jr", {"architecture": "jumprelu"}, {**w, "threshold": theta}))
    ref = np.where(pre > theta, np.maximum(pre, 0), 0)
    _close(sae.encode(torch.from_numpy(x)), ref)


def test_saelens_gated_converts_exactly(tmp_path):
    x = _x(256)
    w = _base_weights()
    b_gate, r_mag, b_mag = _f32(D_SAE, scale=0.5), _f32(D_SAE, scale=0.3), _f32(D_SAE, scale=0.5)
    folder = _saelens(
        tmp_path / "gated", {"architecture": "gated"}, {**w, "b_gate": b_gate, "r_mag": r_mag, "b_mag": b_mag}
    )
    del w["b_enc"]
    assert foreign_format(folder) == "saelens"
    sae = load_sae(folder)
    assert sae.cfg.architecture == "jumprelu"
    centred = x - w["b_dec"]
    gate = (centred @ w["W_enc"] + b_gate) > 0
    mag = np.maximum(centred @ (w["W_enc"] * np.exp(r_mag)) + b_mag, 0)
    ref = gate * mag
    _close(sae.encode(torch.from_numpy(x)), ref, sae(torch.from_numpy(x)), ref @ w["W_dec"] + w["b_dec"])
    assert (ref > 0).any() and (~gate & (centred @ (w["W_enc"] * np.exp(r_mag)) + b_mag > 0)).any()  # the gate matters


def test_saelens_topk_rescaled_and_legacy(tmp_path):
    x = _x()
    w = _base_weights()
    norms = np.linalg.norm(w["W_dec"], axis=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    ref_codes = _topk_ref(pre, K)
    ref_hat = (ref_codes / norms) @ w["W_dec"] + w["b_dec"]
    sae = load_sae(
        _saelens(tmp_path / "rescaled", {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True}, w)
    )
    _close(sae.encode(torch.from_numpy(x)), ref_codes, sae(torch.from_numpy(x)), ref_hat)
    legacy = load_sae(
        _saelens(
            tmp_path / "legacy",
            {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}},
            w,
        )
    )
    assert legacy.cfg.architecture == "topk" and legacy.cfg.k == K


def test_saelens_refusals(tmp_path):
    w = _base_weights()
    with pytest.raises(MonoscopeError, match="normalize_activations"):
        load_sae(
            _saelens(
                tmp_path / "n",
                {"architecture": "gated", "normalize_activations": "expected_average_only_in"},
                {**w, "b_gate": w["b_enc"], "r_mag": w["b_enc"], "b_mag": w["b_enc"]},
            )
        )
    with pytest.raises(MonoscopeError, match="not supported"):
        load_sae(_saelens(tmp_path / "m", {"architecture": "matryoshka_whatever"}, w))


def _sparsify(folder: Path, cfg: dict | None = None):
    folder.mkdir(parents=True)
    tensors = {
        "encoder.weight": _f32(D_SAE, D_IN),
        "encoder.bias": _f32(D_SAE, scale=0.1),
        "W_dec": _f32(D_SAE, D_IN),
        "b_dec": _f32(D_IN, scale=0.1),
    }
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": D_SAE,
                "k": K,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": D_IN,
                **(cfg or {}),
            }
        )
    )
    save_file(tensors, str(folder / "sae.safetensors"))
    return tensors


def test_sparsify_folder_and_hookpoints(tmp_path):
    root = tmp_path / "sae-pythia"
    t = _sparsify(root / "layers.6")
    _sparsify(root / "layers.7.mlp")
    x = _x()
    # sparsify: TopK(ReLU(encoder(x - b_dec)))
    pre = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
    ref = _topk_ref(pre, K)
    sae = load_sae(root / "layers.6")
    _close(sae.encode(torch.from_numpy(x)), ref, sae(torch.from_numpy(x)), ref @ t["W_dec"] + t["b_dec"])
    assert sae.info["hook_point"] == "resid_post.6" and sae.info["format"] == "sparsify"
    assert load_any_sae(root, subpath="layers.7.mlp").info["hook_point"] == "mlp_out.7"
    with pytest.raises(MonoscopeError, match="layers.6, layers.7.mlp"):
        load_sae(root)
    _sparsify(tmp_path / "gm" / "layers.1", {"activation": "groupmax"})
    with pytest.raises(MonoscopeError, match="groupmax"):
        load_sae(tmp_path / "gm" / "layers.1")


def _gemmascope(folder: Path) -> dict:
    folder.mkdir(parents=True)
    params = {
        "W_enc": _f32(D_IN, D_SAE),
        "W_dec": _f32(D_SAE, D_IN),
        "b_enc": _f32(D_SAE, scale=0.1),
        "b_dec": _f32(D_IN, scale=0.5),
        "threshold": np.abs(_f32(D_SAE)),
    }
    np.savez(folder / "params.npz", **params)
    return params


def test_gemmascope_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_5"
    p = _gemmascope(folder)
    x = _x()
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope does not subtract b_dec from the input
    ref = (pre > p["threshold"]) * np.maximum(pre, 0)
    for spec in (folder, folder / "params.npz"):
        sae = load_sae(spec)
        _close(sae.encode(torch.from_numpy(x)), ref, sae(torch.from_numpy(x)), ref @ p["W_dec"] + p["b_dec"])
    assert sae.info["hook_point"] == "resid_post.3" and sae.info["model"] == "google/gemma-2-2b"
    assert sae.cfg.apply_b_dec_to_input is False
    assert load_sae(folder, dtype="float64").W_enc.dtype == torch.float64


HUB_SCRIPT = r"""
import sys
from monoscope.sae.loader import load_any_sae
from monoscope.errors import MonoscopeError
sae = load_any_sae("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5")
print("OK", sae.info["hook_point"], sae.info["source"], sae.cfg.d_sae)
sae = load_any_sae("google/gemma-scope-2b-pt-res", subpath="layer_3/width_16k/average_l0_5")
print("OK2", sae.info["model"])
from monoscope.features.loading import open_sae  # what `monoscope analyze/serve/steer --sae hf://...` use
print("OK3", open_sae("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5").cfg.d_sae)
try:
    load_any_sae("hf://google/not-cached/layer_1")
except MonoscopeError as err:
    print("ERR", err)
"""


def test_hub_from_offline_cache(tmp_path):
    commit = "a" * 40
    repo_dir = tmp_path / "hub" / "models--google--gemma-scope-2b-pt-res"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    _gemmascope(repo_dir / "snapshots" / commit / "layer_3" / "width_16k" / "average_l0_5")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"OK resid_post.3 hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5 {D_SAE}"
    assert lines[1] == "OK2 google/gemma-2-2b"
    assert lines[2] == f"OK3 {D_SAE}"
    assert (
        lines[3].startswith("ERR could not fetch google/not-cached/layer_1 from the Hugging Face hub")
        and "HF_HUB_OFFLINE" in lines[3]
    )


def test_model_mismatch(tmp_path):
    w = _base_weights()
    sae = load_sae(_saelens(tmp_path / "s", {"architecture": "standard"}, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_model_match(sae, "openai-community/gpt2", D_IN) is None  # same model, org prefix ignored
    with pytest.warns(UserWarning, match="trained on 'gpt2'"):
        assert check_model_match(sae, "EleutherAI/pythia-70m", D_IN)
    with pytest.raises(MonoscopeError, match="d_model=16"):
        check_model_match(sae, "gpt2", 16)
