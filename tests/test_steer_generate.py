"""Steering inside transformers' `generate`: an empty spec changes nothing, the KV cache changes nothing,
and prompt / generated positions are told apart across generate's forward calls."""

from __future__ import annotations

import threading

import pytest
import torch
from tests.test_steer_core import HOOK, make_sae
from transformers import TextIteratorStreamer

from monoscope.model import edit, load_model
from monoscope.steer import Steering, generate, steer

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def ids(lm):
    return lm.tokenizer(PROMPT, return_tensors="pt").input_ids


def plain(lm, ids, **kw):
    return lm.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=lm.tokenizer.eos_token_id, **kw)


@pytest.mark.parametrize("sampling", [False, True])
def test_empty_steering_gives_the_same_tokens_as_plain_generate(lm, ids, sampling):
    kw = dict(max_new_tokens=12, do_sample=sampling, **({"temperature": 1.0, "top_k": 0} if sampling else {}))
    torch.manual_seed(7)
    expected = plain(lm, ids, **kw)
    with steer(lm, Steering(make_sae(model=lm.name))):
        torch.manual_seed(7)
        got = plain(lm, ids, **kw)
    assert torch.equal(got, expected)
    # the helper too: greedy and seeded sampling
    result = generate(lm, PROMPT, steering=Steering(), max_new_tokens=12, seed=7 if sampling else None)
    torch.manual_seed(7)
    again = plain(lm, ids, max_new_tokens=12, do_sample=sampling, **({"temperature": 1.0} if sampling else {}))
    assert result.ids == again[0, ids.shape[1] :].tolist()


def test_streaming_with_an_empty_steering_matches_plain_text(lm, ids):
    def stream_text(steering):
        streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with steer(lm, steering):
            worker = threading.Thread(
                target=plain, args=(lm, ids), kwargs=dict(max_new_tokens=10, do_sample=False, streamer=streamer)
            )
            worker.start()
            text = "".join(streamer)
            worker.join()
        return text

    expected = lm.tokenizer.decode(
        plain(lm, ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
    )
    assert stream_text(Steering()) == expected


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steered_generation_with_the_kv_cache_equals_without(lm, gpt2, positions, arch):
    lm = lm if arch == "llama" else gpt2
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    sae = make_sae(model=lm.name)
    s = Steering(sae, positions=positions).clamp(3, 2.0).add(7, 1.5).ablate(11)
    with steer(lm, s):
        cached = plain(lm, ids, max_new_tokens=10, do_sample=False, use_cache=True)
    with steer(lm, s):
        uncached = plain(lm, ids, max_new_tokens=10, do_sample=False, use_cache=False)
    unsteered = plain(lm, ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, unsteered)
    torch.manual_seed(3)
    with steer(lm, s):
        sampled = plain(lm, ids, max_new_tokens=10, do_sample=True, use_cache=True)
    torch.manual_seed(3)
    with steer(lm, s):
        sampled_nc = plain(lm, ids, max_new_tokens=10, do_sample=True, use_cache=False)
    assert torch.equal(sampled, sampled_nc)


def record_deltas(lm, steering, ids, use_cache):
    """Per forward call of generate: (input length, change the steering made at HOOK [T, d])."""
    before, after = [], []
    with edit(lm.model, {HOOK: lambda x: before.append(x.detach().clone())}):
        with steer(lm, steering):
            with edit(lm.model, {HOOK: lambda x: after.append(x.detach().clone())}):
                plain(lm, ids, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    return [(b.shape[1], (a - b)[0]) for b, a in zip(before, after)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_only_and_generated_only_positions(lm, ids, use_cache):
    sae = make_sae(model=lm.name)
    n = ids.shape[1]
    step = 2.0 * sae.W_dec[5]
    for positions in ("prompt", "generated", "all"):
        calls = record_deltas(lm, Steering(sae, positions=positions).add(5, 2.0), ids, use_cache)
        assert len(calls) == 4
        for call, (length, delta) in enumerate(calls):
            start = 0 if (call == 0 or not use_cache) else n + call - 1
            for t in range(length):
                absolute = start + t
                steered = absolute > 0 and (positions == "all" or (positions == "prompt") == (absolute < n))
                want = step if steered else torch.zeros_like(step)
                assert torch.allclose(delta[t], want, atol=1e-6), (positions, call, t)


def test_two_generate_calls_in_one_block_each_start_a_new_prompt(lm, ids):
    sae = make_sae(model=lm.name)
    s = Steering(sae, positions="generated").add(5, 3.0)
    with steer(lm, s):
        first = plain(lm, ids, max_new_tokens=6, do_sample=False)
        second = plain(lm, ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(first, second)
