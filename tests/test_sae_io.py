"""Saved SAEs: SAELens's folder format, exact round trips, and the errors a bad folder gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from monoscope.errors import MonoscopeError
from monoscope.sae import (
    BatchTopKTrainingSAE,
    JumpReLUSAE,
    JumpReLUTrainingSAE,
    ReLUSAE,
    ReLUTrainingSAE,
    TopKSAE,
    TopKTrainingSAE,
    TrainConfig,
    load_sae,
    save_sae,
)
from monoscope.sae.io import sae_hook_point
from monoscope.sae.training import StepContext


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TRAINING = {
    "topk": (TopKTrainingSAE, TopKSAE, "topk"),
    "batchtopk": (BatchTopKTrainingSAE, JumpReLUSAE, "jumprelu"),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUSAE, "jumprelu"),
    "relu": (ReLUTrainingSAE, ReLUSAE, "standard"),
}


def trained_a_little(architecture: str, steps: int = 5):
    """A training-form SAE after a few optimiser-free forward passes (BatchTopK needs them for its threshold)."""
    cfg = TrainConfig(d_in=12, d_sae=48, k=3, total_tokens=640, batch_size=64, architecture=architecture, seed=5)
    sae = TRAINING[architecture][0](cfg)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=generator) * 2 + 1
    sae.initialize(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(48, generator=generator) * 0.1)
    for step in range(steps):
        sae.training_forward(torch.randn(64, 12, generator=generator) * 2 + 1, StepContext(step, 10))
    return sae


@pytest.mark.parametrize("architecture", list(TRAINING))
def test_round_trip_is_exact_for_every_architecture(tmp_path, architecture):
    training_sae = trained_a_little(architecture)
    inference = training_sae.to_inference()
    assert type(inference) is TRAINING[architecture][1]
    save_sae(inference, tmp_path / "sae", info={"hook_name": "resid_post.3", "activation_scale": 0.5})
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is TRAINING[architecture][1]
    assert loaded.cfg.architecture == TRAINING[architecture][2]
    assert loaded.state_dict().keys() == inference.state_dict().keys()
    for name, tensor in inference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(100, 12) * 2 + 1
    assert torch.equal(loaded.encode(x), inference.encode(x))
    assert torch.equal(loaded(x), inference(x))
    assert loaded.info["hook_name"] == "resid_post.3"
    assert loaded.info["activation_scale"] == 0.5


def test_batchtopk_is_saved_as_jumprelu_with_its_learned_threshold(tmp_path):
    training_sae = trained_a_little("batchtopk", steps=8)
    threshold = float(training_sae.inference_threshold)
    assert threshold > 0
    save_sae(training_sae, tmp_path / "sae")  # a training-form SAE is converted on save
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert torch.allclose(weights["threshold"], torch.full((48,), threshold))
    loaded = load_sae(tmp_path / "sae")
    x = torch.randn(200, 12) * 2 + 1
    pre = training_sae.pre_activations(x)
    expected = torch.where(pre > threshold, pre, torch.zeros_like(pre))
    assert torch.allclose(loaded.encode(x), expected, atol=1e-6)


def test_cfg_json_has_the_fields_saelens_reads(tmp_path):
    sae = trained_a_little("topk").to_inference()
    info = {
        "model_name": "HuggingFaceTB/SmolLM2-135M",
        "hook_name": "resid_post.15",
        "context_size": 256,
        "dataset_path": "fortunes",
        "activation_scale": 0.25,
        "training": {"steps": 10},
    }
    folder = save_sae(sae, tmp_path / "sae", info)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "monoscope.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3
    assert (cfg["d_in"], cfg["d_sae"]) == (12, 48)
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    metadata = cfg["metadata"]
    assert metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert metadata["hook_name"] == "blocks.15.hook_resid_post"  # what SAELens's HookedSAETransformer attaches to
    assert metadata["hook_head_index"] is None
    assert metadata["context_size"] == 256 and metadata["prepend_bos"] is True
    assert metadata["dataset_path"] == "fortunes"
    assert metadata["sae_lens_training_version"] is None
    assert "activation_scale" not in cfg and "training" not in cfg  # monoscope's own facts stay out
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "W_enc": (12, 48),
        "W_dec": (48, 12),
        "b_enc": (48,),
        "b_dec": (12,),
    }
    own = json.loads((folder / "monoscope.json").read_text())
    assert own["activation_scale"] == 0.25 and own["training"] == {"steps": 10}
    assert own["hook_name"] == "resid_post.15" and sae_hook_point(load_sae(folder)) == "resid_post.15"


def test_relu_is_standard_without_input_centering(tmp_path):
    save_sae(trained_a_little("relu").to_inference(), tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and "k" not in cfg
    assert cfg["apply_b_dec_to_input"] is False


def test_a_folder_without_monoscope_json_loads_with_empty_info(tmp_path):
    save_sae(trained_a_little("jumprelu").to_inference(), tmp_path / "sae")
    (tmp_path / "sae" / "monoscope.json").unlink()
    assert load_sae(tmp_path / "sae").info == {}


def test_wrong_shapes_say_exactly_what_is_wrong(tmp_path):
    folder = save_sae(trained_a_little("topk").to_inference(), tmp_path / "sae")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["W_dec"] = weights["W_dec"][:40]
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with pytest.raises(
        MonoscopeError, match=r"W_dec has shape \[40, 12\] but cfg.json \(d_in=12, d_sae=48\) needs \[48, 12\]"
    ):
        load_sae(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    folder = save_sae(trained_a_little("jumprelu").to_inference(), tmp_path / "sae")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    del weights["threshold"]
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with pytest.raises(MonoscopeError, match="lacks threshold"):
        load_sae(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "topk"
    cfg["k"] = 3
    (folder / "cfg.json").write_text(json.dumps(cfg))
    weights["extra"] = torch.zeros(3)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with pytest.raises(MonoscopeError, match="does not use: extra"):
        load_sae(folder)


def test_unknown_architecture_and_missing_files(tmp_path):
    folder = save_sae(trained_a_little("topk").to_inference(), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MonoscopeError, match="'gated' is not supported; monoscope can load: topk, jumprelu, standard"):
        load_sae(folder)
    with pytest.raises(MonoscopeError, match="is not a folder"):
        load_sae(tmp_path / "nowhere")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(MonoscopeError, match="weights are missing"):
        load_sae(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MonoscopeError, match="has no cfg.json"):
        load_sae(tmp_path / "empty")


def test_load_reads_a_saelens_style_folder_with_extra_fields(tmp_path):
    sae = trained_a_little("jumprelu").to_inference()
    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["neuronpedia_id"] = None  # fields other SAELens versions write
    cfg["metadata"]["model_class_name"] = "HookedTransformer"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(folder, dtype="float64")
    assert loaded.dtype == torch.float64
    assert loaded.cfg.metadata["model_class_name"] == "HookedTransformer"
    assert torch.allclose(loaded.threshold.float(), sae.threshold)
