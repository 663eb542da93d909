"""Every block layout (tests/families.py: Llama, GPT-2, Gemma 3, OLMo 2, GLM-4, GPT-NeoX, Phi, Qwen2-MoE,
Mixtral) on tiny random models: hook points mean what they say, stop-early capture equals a full forward,
steering leaves plain generation alone and is the same with and without the KV cache, and directional
ablation removes the direction from the residual stream at every layer, hooked (every family, post-norm
ones included) and baked into the weights (where that can be exact)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.families import FAMILIES, POST_NORM, WIDTH, tiny_family

from monoscope.errors import MonoscopeError
from monoscope.model import capture, find_blocks, is_post_norm, last_logits, post_norms, resolve, run_to, token_logprobs
from monoscope.steer import Steering, steer
from monoscope.steer.ablation import ablation_points, directional_ablation, orthogonalize_weights

KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def models(tokenizer):
    return {family: tiny_family(family, len(tokenizer)) for family in FAMILIES}


def _ids(tokenizer, text: str = "def add(a, b):\n    return a + b\nThe quick brown fox") -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def _direction(seed: int = 5) -> torch.Tensor:
    return torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_points_are_the_residual_stream_and_what_each_sub_block_adds(family, models, tokenizer):
    model = models[family]
    points = [f"{kind}.{layer}" for layer in range(2) for kind in KINDS]
    with torch.no_grad(), capture(model, points) as acts:
        model(_ids(tokenizer))
    for layer in range(2):
        added = acts[f"resid_pre.{layer}"] + acts[f"attn_out.{layer}"] + acts[f"mlp_out.{layer}"]
        assert torch.allclose(acts[f"resid_post.{layer}"], added, atol=1e-5), family
    assert torch.equal(acts["resid_pre.1"], acts["resid_post.0"])
    attn_norm, mlp_norm = post_norms(find_blocks(model)[1])
    assert is_post_norm(model) == (family in POST_NORM)
    if family in POST_NORM:  # the sites are the norms' outputs: what is added, not what attention/the MLP computed
        assert resolve(model, "attn_out.1")[1] is attn_norm and resolve(model, "mlp_out.1")[1] is mlp_norm
    else:
        assert attn_norm is None and mlp_norm is None


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_early_capture_equals_the_full_forward_and_skips_later_layers(family, models, tokenizer):
    model = models[family]
    ids = _ids(tokenizer)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    calls = []
    handle = find_blocks(model)[1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        acts = run_to(model, ["resid_pre.0", "resid_post.0"], ids)
    finally:
        handle.remove()
    assert not calls, "layer 1 ran although the deepest hook point is in layer 0"
    assert torch.equal(acts["resid_pre.0"], hidden[0]) and torch.equal(acts["resid_post.0"], hidden[1])


def _generate(model, ids: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=2,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_empty_is_plain_and_cached_equals_uncached(family, models, tokenizer):
    model = models[family]
    ids = _ids(tokenizer, "Q: What is the capital of France?\nA:")
    plain = _generate(model, ids)
    with steer(model, Steering()):
        assert torch.equal(_generate(model, ids), plain)
    r = _direction()
    spec = (
        Steering(skip_first=False)
        .add_vector(3.0 * r / r.norm(), 1.0, hook="resid_post.0")
        .orthogonal(_direction(6), "mlp_out.1", c=0.0)
    )
    with steer(model, spec):
        cached, uncached = _generate(model, ids, True), _generate(model, ids, False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        clean = model(ids).logits
        with steer(model, spec):
            steered = model(ids).logits
    assert not torch.allclose(steered, clean, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_directional_ablation_leaves_no_component_anywhere_in_the_stream(family, models, tokenizer):
    model = models[family]
    ids = _ids(tokenizer)
    r = _direction()
    u = r / r.norm()
    points = [f"{kind}.{layer}" for layer in range(2) for kind in ("resid_pre", "resid_post")]
    with torch.no_grad():
        with capture(model, points) as before:
            clean = model(ids).logits
        with directional_ablation(model, r), capture(model, points) as after:
            hooked = model(ids).logits
    largest = max(float((x @ u).abs().max()) for x in before.values())
    for point, x in after.items():
        assert float((x @ u).abs().max()) < 1e-4 * largest, (family, point)
    assert not torch.allclose(hooked, clean, atol=1e-3)
    # the same edit spelled as `orthogonal` direction edits at every write site (what `steer` composes with)
    spec = Steering(skip_first=False)
    for point in ablation_points(model):
        spec.orthogonal(r, point, c=0.0)
    with torch.no_grad(), steer(model, spec):
        assert torch.allclose(model(ids).logits, hooked, atol=1e-5)
    baked = copy.deepcopy(model)
    if family in POST_NORM:
        with pytest.raises(MonoscopeError, match="--ablate-direction"):
            orthogonalize_weights(baked, r)
    else:
        orthogonalize_weights(baked, r)
        with torch.no_grad():
            assert torch.allclose(baked(ids).logits, hooked, atol=1e-4), family


@pytest.mark.parametrize("family", POST_NORM)
def test_orthogonal_and_cap_edits_act_on_what_post_norm_sub_blocks_add(family, models, tokenizer):
    model = models[family]
    ids = _ids(tokenizer)
    r = _direction(7)
    u = r / r.norm()
    with torch.no_grad(), capture(model, ["attn_out.1", "resid_post.1"]) as clean:
        model(ids)
    cap = 0.5 * float((clean["attn_out.1"] @ u).max())
    assert cap > 0
    spec = Steering(skip_first=False).cap(r, "attn_out.1", cap).orthogonal(r, "resid_post.1", c=0.0)
    with torch.no_grad(), steer(model, spec), capture(model, ["attn_out.1", "resid_post.1"]) as edited:
        model(ids)
    assert float((edited["attn_out.1"] @ u).max()) <= cap + 1e-5
    assert float((edited["resid_post.1"] @ u).abs().max()) < 1e-5
    assert torch.allclose(
        edited["attn_out.1"],
        clean["attn_out.1"] - ((clean["attn_out.1"] @ u) - cap).clamp_min(0).unsqueeze(-1) * u,
        atol=1e-5,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_the_last_positions_only_equals_the_full_logits(family, models, tokenizer):
    model = models[family]
    ids = _ids(tokenizer)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        last = last_logits(model, ids, 5)
        targets = ids[:, -5:]
        expected = torch.log_softmax(full[:, -5:].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        got = token_logprobs(last, targets)
    assert last.shape == (1, 5, full.shape[-1]) and torch.allclose(last, full[:, -5:], atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)
