"""Steering vectors (contrastive, saved, added, exported to llama.cpp GGUF) and directional ablation, hooked
and baked into the weights (tiny Llama and tiny GPT-2)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from monoscope.errors import MonoscopeError
from monoscope.model import edit, load_model, run_to
from monoscope.steer import Steering, SteeringVector, contrastive_vector, export_gguf, read_gguf, steer
from monoscope.steer.ablation import directional_ablation, orthogonalize_weights, save_orthogonalized

POSITIVE = ["I love this, it is wonderful!", "What a great and happy day.", "Beautiful work, thank you!"]
NEGATIVE = ["I hate this, it is awful.", "What a terrible and sad day.", "Ugly work, go away."]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def test_contrastive_vector_is_the_difference_of_means(lm):
    v = contrastive_vector(lm, POSITIVE, NEGATIVE, ["resid_post.0", "resid_post.1"], position="last")

    def last(prompts, hook):
        rows = [run_to(lm.model, hook, lm.tokenizer(p, return_tensors="pt").input_ids)[hook][0, -1] for p in prompts]
        return torch.stack(rows).mean(0)

    for hook in ("resid_post.0", "resid_post.1"):
        assert torch.allclose(v.directions[hook], last(POSITIVE, hook) - last(NEGATIVE, hook), atol=1e-5)
    mean_v = contrastive_vector(lm, POSITIVE, NEGATIVE, "resid_post.1", position="mean")

    def avg(prompts):  # the first position (an attention sink) left out
        return torch.stack(
            [
                run_to(lm.model, "resid_post.1", lm.tokenizer(p, return_tensors="pt").input_ids)["resid_post.1"][
                    0, 1:
                ].mean(0)
                for p in prompts
            ]
        ).mean(0)

    assert torch.allclose(mean_v.directions["resid_post.1"], avg(POSITIVE) - avg(NEGATIVE), atol=1e-5)


def test_save_load_round_trip_and_adding_it_during_generation(lm, tmp_path):
    v = contrastive_vector(lm, POSITIVE, NEGATIVE, ["resid_post.0", "resid_post.1"])
    tensors, meta = v.save(tmp_path / "love.safetensors")
    assert tensors.name == "love.safetensors" and meta.name == "love.json"
    back = SteeringVector.load(tmp_path / "love")
    assert back.model == v.model and back.meta["n_positive"] == 3 and back.meta["position"] == "last"
    for hook in v.hooks:
        assert torch.equal(back.directions[hook], v.directions[hook])
    ids = lm.tokenizer("Tell me", return_tensors="pt").input_ids
    seen = {}
    with edit(lm.model, {"resid_post.1": lambda x: seen.__setitem__("before", x.clone())}):
        with steer(lm, Steering().add_vector(back, 3.0, hook="resid_post.1")):
            with edit(lm.model, {"resid_post.1": lambda x: seen.__setitem__("after", x.clone())}):
                lm.model(ids)
    change = seen["after"] - seen["before"]
    assert torch.allclose(change[:, 1:], (3.0 * v.directions["resid_post.1"]).expand_as(change[:, 1:]), atol=1e-5)
    assert torch.equal(change[:, 0], torch.zeros_like(change[:, 0]))


def test_empty_prompt_sets_and_bad_hooks_are_clear_errors(lm):
    with pytest.raises(MonoscopeError, match="positive prompt set is empty"):
        contrastive_vector(lm, [], NEGATIVE, "resid_post.1")
    with pytest.raises(MonoscopeError, match="negative prompt set is empty"):
        contrastive_vector(lm, POSITIVE, [], "resid_post.1")
    with pytest.raises(MonoscopeError, match="does not exist"):
        contrastive_vector(lm, POSITIVE, NEGATIVE, "resid_post.9")
    with pytest.raises(MonoscopeError, match="empty"):
        contrastive_vector(lm, ["  "], NEGATIVE, "resid_post.1")


def test_gguf_export_reads_back_as_a_llama_cpp_control_vector(lm, tmp_path):
    v = contrastive_vector(lm, POSITIVE, NEGATIVE, ["resid_post.1", "resid_pre.1"][:1])
    path = export_gguf(v, tmp_path / "love.gguf", coefficient=2.0)
    meta, directions = read_gguf(path)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama"
    assert int(meta["controlvector.layer_count"]) == 1
    assert list(directions) == [1]  # resid_post.1 = output of block 1 = llama.cpp direction.1
    assert torch.allclose(directions[1], 2.0 * v.directions["resid_post.1"], atol=1e-6)
    import gguf

    reader = gguf.GGUFReader(str(path))
    (tensor,) = reader.tensors
    assert (
        tensor.name == "direction.1"
        and tensor.tensor_type == gguf.GGMLQuantizationType.F32
        and list(tensor.shape) == [32]
    )
    with pytest.raises(MonoscopeError, match="block 0"):
        export_gguf(SteeringVector({"resid_post.0": torch.ones(32)}), tmp_path / "bad.gguf")
    with pytest.raises(MonoscopeError, match="block outputs"):
        export_gguf(SteeringVector({"mlp_out.1": torch.ones(32)}), tmp_path / "bad.gguf")
    pre = export_gguf(SteeringVector({"resid_pre.2": torch.ones(32)}), tmp_path / "pre.gguf")
    assert list(read_gguf(pre)[1]) == [1]


@pytest.mark.parametrize("which", ["lm", "gpt2"])
def test_weight_orthogonalisation_equals_hooked_directional_ablation(which, lm, gpt2, tmp_path, request):
    loaded = lm if which == "lm" else gpt2
    with torch.no_grad():  # give the random models non-trivial biases and a larger scale, so the check has teeth
        for name, p in loaded.model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    r = torch.randn(32, generator=torch.Generator().manual_seed(5))
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        clean = loaded.model(ids).logits
        with directional_ablation(loaded.model, r):
            hooked = loaded.model(ids).logits
    out = save_orthogonalized(loaded, r, tmp_path / f"{which}-ablated")
    baked = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = baked(ids).logits
    assert not torch.allclose(hooked, clean, atol=1e-3)
    assert torch.allclose(logits, hooked, atol=1e-4), (logits - hooked).abs().max()
    # the original model object is untouched
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, clean)


def test_orthogonalised_stream_has_no_component_along_the_direction(gpt2):
    import copy

    model = copy.deepcopy(gpt2.model)
    r = torch.randn(32, generator=torch.Generator().manual_seed(9))
    orthogonalize_weights(model, r)
    u = r / r.norm()
    ids = gpt2.tokenizer("Hello there, world.", return_tensors="pt").input_ids
    acts = run_to(model, ["resid_pre.0", "resid_post.0", "resid_post.1"], ids)
    for x in acts.values():
        assert float((x @ u).abs().max()) < 1e-4
