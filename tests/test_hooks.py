"""Hook points resolve on the model's own modules, capture what transformers computes, and stop early."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_gpt2, tiny_llama

from monoscope.errors import MonoscopeError
from monoscope.model import HookPoint, capture, edit, find_blocks, run_to


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tokenizer):
    return tiny_llama(len(tokenizer)) if request.param == "llama" else tiny_gpt2(len(tokenizer))


def ids(vocab: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(1))


def test_residual_capture_equals_output_hidden_states(model):
    x = ids(model.config.vocab_size)
    hidden = model(
        x, output_hidden_states=True
    ).hidden_states  # embeddings, block 0 out, block 1 out (+final norm for gpt2)
    acts = run_to(model, ["resid_pre.0", "resid_post.0", "resid_pre.1"], x)
    assert torch.allclose(acts["resid_pre.0"], hidden[0], atol=1e-6)
    assert torch.allclose(acts["resid_post.0"], hidden[1], atol=1e-6)
    assert torch.allclose(acts["resid_pre.1"], hidden[1], atol=1e-6)


def test_attention_and_mlp_outputs_sum_to_the_residual_update(model):
    x = ids(model.config.vocab_size)
    acts = run_to(model, ["resid_pre.1", "attn_out.1", "mlp_out.1", "resid_post.1"], x)
    update = acts["resid_post.1"] - acts["resid_pre.1"]
    assert torch.allclose(update, acts["attn_out.1"] + acts["mlp_out.1"], atol=1e-5)


def test_stop_early_never_runs_later_layers(model):
    blocks = find_blocks(model)
    calls = {"block1": 0, "head": 0}
    h1 = blocks[1].register_forward_hook(lambda *a: calls.__setitem__("block1", calls["block1"] + 1))
    h2 = model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    try:
        acts = run_to(model, "resid_post.0", ids(model.config.vocab_size))
    finally:
        h1.remove(), h2.remove()
    assert acts["resid_post.0"].shape[-1] == 32
    assert calls == {"block1": 0, "head": 0}
    # A capture without stop_early runs the whole model.
    with capture(model, "resid_post.0") as store:
        logits = model(ids(model.config.vocab_size)).logits
    assert logits.shape[-1] == model.config.vocab_size and "resid_post.0" in store


def test_hooks_are_removed_even_on_error(model):
    blocks = find_blocks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with edit(model, {"resid_post.1": lambda t: (_ for _ in ()).throw(RuntimeError("boom"))}):
            model(ids(model.config.vocab_size))
    assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in blocks)


def test_edit_replaces_activations_and_identity_edit_changes_nothing(model):
    x = ids(model.config.vocab_size)
    clean = model(x).logits
    with edit(model, {"resid_post.0": lambda t: t.clone()}):
        same = model(x).logits
    with edit(model, {"resid_pre.1": lambda t: torch.zeros_like(t)}):
        zeroed = model(x).logits
    assert torch.allclose(clean, same)
    assert not torch.allclose(clean, zeroed)
    # Zeroing the input of block 1 is the same as zeroing the output of block 0.
    with edit(model, {"resid_post.0": lambda t: torch.zeros_like(t)}):
        zeroed_post = model(x).logits
    assert torch.allclose(zeroed, zeroed_post, atol=1e-5)


def test_bad_hook_points_get_clear_errors(model):
    with pytest.raises(MonoscopeError, match=r"resid_post.99 does not exist: the model has 2 layers \(0-1\)"):
        run_to(model, "resid_post.99", ids(model.config.vocab_size))
    with pytest.raises(MonoscopeError, match="unknown hook kind|cannot read hook point"):
        HookPoint.parse("residual.3")
    with pytest.raises(MonoscopeError, match="cannot read hook point"):
        HookPoint.parse("resid_post")


def test_other_tools_hook_names_map_to_hook_points():
    assert str(HookPoint.parse("blocks.15.hook_resid_post")) == "resid_post.15"
    assert str(HookPoint.parse("blocks.3.hook_mlp_out")) == "mlp_out.3"
    assert str(HookPoint.parse("layers.7")) == "resid_post.7"
    assert str(HookPoint.parse("model.layers.7.self_attn")) == "attn_out.7"
