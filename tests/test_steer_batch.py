"""Batched steered decoding (`steer/batch.py`) on the tiny Llama and GPT-2: every row of a batch gives the same
greedy tokens as its request alone (with and without steering, with the KV cache, rows of different lengths
left-padded, rows joining mid-decode and leaving early), one encoder GEMM per SAE per forward for all rows,
and a bad row (non-finite activations, an invalid spec, a cancel) never disturbs the others."""

from __future__ import annotations

import threading

import pytest
import torch
from tests.test_steer_core import HOOK, make_sae

from monoscope.errors import MonoscopeError
from monoscope.model import load_model
from monoscope.steer import Steering, SteeringVector, generate, generate_batch, steer
from monoscope.steer.batch import BatchEngine, Request, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Q: What is the capital of France?\nA:",
    "I",
    "def add(a, b):\n    return a + b\nimport os\nprint(os.getcwd())",
    "There once was a man",
    "Beware of bugs",
]
TOKENS = 10


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def specs(lm):
    """A different spec per prompt: none, feature modes at each position kind, a condition, a second SAE,
    direction edits (vector add, orthogonal, cap) and strengths."""
    sae, other = make_sae(model=lm.name), make_sae(model=lm.name, seed=1)
    torch.manual_seed(5)
    vector = SteeringVector({HOOK: torch.randn(32)}, name="v")
    direction = torch.randn(32)
    return [
        None,
        Steering(sae).clamp(3, 2.0).add(7, 1.5).ablate(11),
        Steering(sae, positions="generated").multiply(9, 3.0).add(5, 2.0, when="3>0.1"),
        Steering(sae, positions="prompt", strength=0.5).add(5, 3.0).clamp(12, 4.0, sae=other),
        Steering().add_vector(vector, 2.0).orthogonal(direction, HOOK, 0.0),
        Steering(sae, skip_first=False).cap(direction, HOOK, 0.1).clamp(20, -1.0),
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_row_equals_its_request_alone(arch, llama, gpt2):
    lm = llama if arch == "llama" else gpt2
    steerings = specs(lm)
    batch = generate_batch(lm, PROMPTS, steerings=steerings, max_new_tokens=TOKENS, ignore_eos=True)
    for i, (prompt, s) in enumerate(zip(PROMPTS, steerings)):
        alone = generate(lm, prompt, steering=s, max_new_tokens=TOKENS)
        assert batch[i].ids == alone.ids, (arch, i)
        assert batch[i].text == alone.text and batch[i].finish_reason == "length"
        if i in (1, 3):  # and without the KV cache
            assert generate(lm, prompt, steering=s, max_new_tokens=TOKENS, use_cache=False).ids == alone.ids
    plain = generate_batch(lm, PROMPTS, max_new_tokens=TOKENS, ignore_eos=True)
    changed = [plain[i].ids != batch[i].ids for i in range(1, len(PROMPTS))]
    assert sum(changed) >= 3, changed  # the steering really acts in the batch
    assert plain[0].ids == batch[0].ids


def _ids(lm, prompt):
    return lm.tokenizer(prompt).input_ids


def test_rows_join_mid_decode_and_leave_early(llama):
    lm = llama
    steerings = specs(lm)
    engine = BatchEngine(lm, max_batch=4)
    results = {}
    lengths = [TOKENS, 3, TOKENS, 6, TOKENS, 2]

    def add(i):
        params = SamplingParams(max_new_tokens=lengths[i], min_new_tokens=lengths[i])
        engine.add(
            Request(_ids(lm, PROMPTS[i]), steerings[i], params), on_done=lambda r, i=i: results.__setitem__(i, r)
        )

    add(0), add(1)
    for _ in range(4):
        engine.step()
    assert 1 in results and engine.running == 1  # row 1 left after 3 tokens, row 0 runs on
    add(3)  # a longer prompt joins a running row: the cache is left-padded to the new width
    engine.step()
    assert engine.running == 2
    add(2), add(4), add(5)  # more than max_batch: one waits for a free row
    engine.step()
    assert engine.running <= 4 and engine.running + engine.waiting + len(results) == 6
    engine.run()
    assert sorted(results) == list(range(6)) and not engine.has_work()
    for i, r in results.items():
        alone = generate(lm, PROMPTS[i], steering=steerings[i], max_new_tokens=lengths[i])
        assert r.ids == alone.ids, i


def test_one_encoder_gemm_per_sae_per_forward(llama, monkeypatch):
    """Four rows with four different specs on one SAE: the SAE encodes once per forward, for the steered rows."""
    from monoscope.steer import steering as steering_module

    sae = make_sae(model=llama.name)
    calls = []
    real = steering_module.feature_codes

    def counting(s, x, features):
        calls.append((x.shape[0], features.numel()))
        return real(s, x, features)

    monkeypatch.setattr(steering_module, "feature_codes", counting)
    steerings = [
        Steering(sae).clamp(3, 2.0),
        Steering(sae).multiply(9, 2.0).ablate(11),
        None,
        Steering(sae).add(5, 1.0, when="7>0.2"),
        Steering(sae).ablate(3),
    ]
    generate_batch(llama, PROMPTS[:5], steerings=steerings, max_new_tokens=4, ignore_eos=True)
    # 1 prefill + 3 decode steps, each one GEMM; a decode step reads 4 rows x 1 token, the union {3, 9, 11, 7}
    assert len(calls) == 4
    assert calls[1:] == [(4, 4)] * 3


def test_a_non_finite_row_ends_alone(llama):
    bad = make_sae(model=llama.name)
    with torch.no_grad():
        bad.W_dec[3] *= 1e35  # clamping it overflows float32: inf, then NaN after the norm
    steerings = [None, Steering(bad).clamp(3, 1e6), specs(llama)[1]]
    out = generate_batch(llama, PROMPTS[:3], steerings=steerings, max_new_tokens=TOKENS, ignore_eos=True)
    assert out[1].finish_reason == "error" and "non-finite" in out[1].error
    for i in (0, 2):
        assert (
            out[i].finish_reason == "length"
            and out[i].ids == generate(llama, PROMPTS[i], steering=steerings[i], max_new_tokens=TOKENS).ids
        )


def test_an_invalid_spec_fails_before_joining(llama):
    engine = BatchEngine(llama)
    good = engine.add(Request(_ids(llama, PROMPTS[0]), None, SamplingParams(max_new_tokens=3)))
    with pytest.raises(MonoscopeError, match="does not exist"):
        engine.add(
            Request(
                _ids(llama, PROMPTS[1]), Steering().clamp(999, 1.0, sae=make_sae(model=llama.name)), SamplingParams()
            )
        )
    with pytest.raises(MonoscopeError, match="8x"):  # a relative value with no maxima to resolve it against
        engine.add(
            Request(
                _ids(llama, PROMPTS[1]),
                Steering(make_sae(model=llama.name), max_activations={}).clamp(3, "8x"),
                SamplingParams(),
            )
        )
    assert engine.waiting == 1
    engine.run()
    assert good.result.finish_reason in ("length", "stop")
    with pytest.raises(MonoscopeError, match="steerings"):
        generate_batch(llama, PROMPTS[:2], steerings=[None])


def test_seeds_streaming_stops_and_cancel(llama):
    # each row samples from its own generator: the same seed gives the same tokens alone and in any batch
    mixed = generate_batch(llama, PROMPTS[:4], seed=[1, 2, 3, 4], temperature=0.9, top_p=0.95, max_new_tokens=8)
    alone = generate_batch(llama, [PROMPTS[2]], seed=3, temperature=0.9, top_p=0.95, max_new_tokens=8)
    assert mixed[2].ids == alone[0].ids
    # streamed deltas add up to the text; a stop string cuts it where it starts
    deltas: dict[int, list[str]] = {}
    out = generate_batch(
        llama, PROMPTS[:3], max_new_tokens=12, ignore_eos=True, on_text=lambda i, d: deltas.setdefault(i, []).append(d)
    )
    assert ["".join(deltas.get(i, [])) for i in range(3)] == [o.text for o in out]
    text = out[0].text
    stop = text[3:5]
    cut = generate_batch(llama, PROMPTS[:2], max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert cut[0].text == text[: text.find(stop)] and cut[0].finish_reason == "stop"
    # a cancelled row leaves; the other finishes as if alone
    cancel = threading.Event()
    engine = BatchEngine(llama)
    gone = engine.add(
        Request(_ids(llama, PROMPTS[0]), None, SamplingParams(max_new_tokens=50, min_new_tokens=50), cancel=cancel)
    )
    kept = engine.add(
        Request(_ids(llama, PROMPTS[1]), None, SamplingParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS))
    )
    for _ in range(3):
        engine.step()
    cancel.set()
    engine.run()
    assert gone.result.finish_reason == "cancelled" and len(gone.result.ids) < 50
    assert kept.result.ids == generate(llama, PROMPTS[1], max_new_tokens=TOKENS).ids


def test_steer_follows_left_padding_in_plain_generate(llama):
    """`steer()` around transformers' own batched `generate`: padding is never edited, each row's first real
    token is its first position, so each row equals its prompt alone."""
    tok = llama.tokenizer
    s = Steering(make_sae(model=llama.name)).clamp(3, 2.0).add(7, 1.5)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    with steer(llama, s), torch.inference_mode():
        out = llama.model.generate(
            **batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id
        )
    new = out[:, batch.input_ids.shape[1] :]
    for i in range(3):
        assert new[i].tolist() == generate(llama, PROMPTS[i], steering=s, max_new_tokens=6).ids, i


def test_a_sliding_window_model_runs_one_row_at_a_time(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    MistralForCausalLM(cfg).eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert BatchEngine(lm, max_batch=8).max_batch == 1
    out = generate_batch(lm, PROMPTS[:3], max_new_tokens=8)
    assert [o.ids for o in out] == [generate(lm, p, max_new_tokens=8).ids for p in PROMPTS[:3]]


def test_a_failing_text_callback_ends_its_row_only(llama):
    def callback(i, delta):
        if i == 0:
            raise ValueError("the client is gone")

    out = generate_batch(llama, PROMPTS[:2], max_new_tokens=TOKENS, ignore_eos=True, on_text=callback)
    assert out[0].finish_reason == "error" and "the client is gone" in out[0].error
    assert out[1].finish_reason == "length" and out[1].ids == generate(llama, PROMPTS[1], max_new_tokens=TOKENS).ids
