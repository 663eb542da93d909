"""Steering math on a real tiny Llama: each mode against its formula, strength, positions, conditions, one encode."""

from __future__ import annotations

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.model import edit, load_model
from monoscope.sae import SAEConfig, TopKSAE, save_sae
from monoscope.steer import Steering, SteeringWarning, steer
from monoscope.steer.spec import Value, parse_feature_spec

HOOK = "resid_post.0"


def make_sae(
    d_in: int = 32,
    d_sae: int = 64,
    k: int = 4,
    hook: str = HOOK,
    model: str | None = None,
    seed: int = 0,
    always_on: int | None = None,
    enc_scale: float = 8.0,
) -> TopKSAE:
    """A random TopK SAE with unit decoder rows; `always_on` gets a large encoder bias so it fires everywhere."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, metadata={"hook_name": hook, "model_name": model})
    )
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(enc_scale * sae.W_dec.T)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        if always_on is not None:
            sae.b_enc[always_on] = 50.0
    sae.info = {"hook_point": hook, "model": model}
    sae.requires_grad_(False)
    return sae


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def ids(lm):
    return lm.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids


def steered_pair(lm, steering, ids, hook=HOOK):
    """(activation before, activation after the steering) at `hook` for one forward pass."""
    seen = {}
    with edit(lm.model, {hook: lambda x: seen.__setitem__("before", x.detach().clone())}):
        with steer(lm, steering):
            with edit(lm.model, {hook: lambda x: seen.__setitem__("after", x.detach().clone())}):
                lm.model(ids)
    return seen["before"], seen["after"]


def test_feature_modes_match_their_formulas(lm, ids):
    sae = make_sae(model=lm.name)
    s = Steering(sae).clamp(3, 5.0).add(7, 2.0).multiply(9, 3.0).ablate(11)
    x, y = steered_pair(lm, s, ids)
    f, D = sae.encode(x), sae.W_dec
    expected = x + (5 - f[..., 3:4]) * D[3] + 2.0 * D[7] + (3 - 1) * f[..., 9:10] * D[9] - f[..., 11:12] * D[11]
    assert torch.allclose(y[:, 1:], expected[:, 1:], atol=1e-5)
    assert torch.equal(y[:, 0], x[:, 0])  # the first position (an attention sink) is left alone by default
    _, y_all = steered_pair(
        lm, Steering(sae, skip_first=False).clamp(3, 5.0).add(7, 2.0).multiply(9, 3.0).ablate(11), ids
    )
    assert torch.allclose(y_all, expected, atol=1e-5)


def test_global_strength_scales_the_edit(lm, ids):
    sae = make_sae(model=lm.name)
    base = Steering(sae).clamp(3, 5.0).add(7, -2.0).multiply(9, 0.5)
    x, y1 = steered_pair(lm, base, ids)
    half = base.copy()
    half.strength = 0.5
    _, y05 = steered_pair(lm, half, ids)
    assert torch.allclose(y05 - x, 0.5 * (y1 - x), atol=1e-5)


def test_clamp_then_reencode_gives_the_value_for_an_orthogonal_decoder_row(lm, ids):
    # Feature 0's decoder row is orthogonal to every other row and the encoder is tied (W_enc = W_dec^T), so
    # moving along d_0 changes only feature 0's pre-activation; its bias keeps it in the top k.
    sae = make_sae(model=lm.name, always_on=0, enc_scale=1.0)
    with torch.no_grad():
        rows = sae.W_dec
        rows[0] = torch.zeros(32)
        rows[0, 0] = 1.0
        rows[1:, 0] = 0.0
        rows[1:] /= rows[1:].norm(dim=1, keepdim=True)
        sae.W_enc.copy_(rows.T)
        sae.b_enc[0] = 2.0  # above every other pre-activation: feature 0 is active at every position
        sae.b_dec.zero_()
    for value in (3.0, 7.5):
        s = Steering(sae, skip_first=False).clamp(0, value)
        x, y = steered_pair(lm, s, ids)
        refit = sae.encode(y)[..., 0]
        assert torch.allclose(refit, torch.full_like(refit, value), atol=1e-4)


def test_direction_modes_orthogonal_and_cap(lm, ids):
    r = torch.randn(32, generator=torch.Generator().manual_seed(3))
    u = r / r.norm()
    s = Steering(skip_first=False).orthogonal(r, HOOK, c=0.25)
    x, y = steered_pair(lm, s, ids)
    comp = x @ u
    assert torch.allclose(y, x + (0.25 - 1) * comp.unsqueeze(-1) * u, atol=1e-6)
    cap_at = float(comp.median())
    x, y = steered_pair(lm, Steering(skip_first=False).cap(r, HOOK, cap_at), ids)
    assert torch.allclose(y, x - (comp - cap_at).clamp_min(0).unsqueeze(-1) * u, atol=1e-6)
    assert float((y @ u).max()) <= cap_at + 1e-5
    x, y = steered_pair(lm, Steering(skip_first=False).orthogonal(r, HOOK, c=0.0), ids)  # c = 0: directional ablation
    assert float((y @ u).abs().max()) < 1e-5


def test_condition_gates_the_edit_to_positions_where_the_feature_fires(lm, ids):
    sae = make_sae(model=lm.name)
    x0, _ = steered_pair(lm, Steering(), ids)
    codes = sae.encode(x0)[0]
    counts = (codes > 0).sum(0)
    cond = int(torch.nonzero((counts > 0) & (counts < codes.shape[0] - 1))[0])  # fires at some positions only
    s = Steering(sae, skip_first=False).add(5, 3.0, when=f"{cond}>0")
    x, y = steered_pair(lm, s, ids)
    changed = (y - x).norm(dim=-1)[0] > 1e-6
    fires = sae.encode(x)[0, :, cond] > 0
    assert torch.equal(changed, fires)
    assert torch.allclose((y - x)[0, fires], (3.0 * sae.W_dec[5]).expand(int(fires.sum()), -1), atol=1e-5)


def test_one_encoder_gemm_per_forward_for_all_features_of_an_sae(lm, ids):
    from torch.overrides import TorchFunctionMode

    sae = make_sae(model=lm.name)
    calls = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            is_product = getattr(func, "__name__", "") in (
                "addmm",
                "mm",
                "matmul",
                "__matmul__",
                "linear",
                "einsum",
                "bmm",
            )
            if is_product and any(a is sae.W_enc for a in args if isinstance(a, torch.Tensor)):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    s = Steering(sae).clamp(1, 2.0).multiply(2, 3).ablate(3).add(4, 1.0).clamp(6, 1.0, when="7>0.1")
    with steer(lm, s), Count():
        lm.model(ids)
    assert len(calls) == 1


def test_values_relative_to_max_activation(lm, ids):
    sae = make_sae(model=lm.name)
    x, y = steered_pair(lm, Steering(sae, max_activations={3: 0.5}, skip_first=False).clamp(3, "8x"), ids)
    f = sae.encode(x)[..., 3:4]
    assert torch.allclose(y, x + (4.0 - f) * sae.W_dec[3], atol=1e-5)
    assert Value.parse("8x").resolve(0.5) == 4.0 and str(Value.parse("-2.5x")) == "-2.5x"


def test_spec_parsing():
    assert parse_feature_spec("12=clamp:8x") == (12, "clamp", Value(8.0, True))
    assert parse_feature_spec("12=add:-4") == (12, "add", Value(-4.0))
    assert parse_feature_spec("12=7") == (12, "clamp", Value(7.0))
    assert parse_feature_spec("12=ablate")[1] == "ablate"
    assert parse_feature_spec("3=mul:2")[1] == "multiply"


@pytest.mark.parametrize(
    "spec",
    [
        "abc",
        "12=clamp",
        "12=foo:3",
        "12=clamp:",
        "=3",
        "12=clamp:nan",
        "12=add:inf",
        "12=clamp:1e7",
        "12=clamp:eightx",
        "-3=clamp:1",
    ],
)
def test_malformed_or_absurd_specs_are_clear_errors(spec):
    with pytest.raises(MonoscopeError) as err:
        Steering(make_sae()).parse(spec)
    assert "\n" not in str(err.value)


def test_bad_feature_ids_models_and_hooks(lm, ids, tiny_gpt2_dir):
    sae = make_sae(model=lm.name)
    for bad in (64, 1000, -1):
        with pytest.raises(MonoscopeError, match="does not exist|negative"):
            Steering(sae).clamp(bad, 1.0)
    with pytest.raises(MonoscopeError, match="whole number"):
        Steering(sae).clamp(2.5, 1.0)
    wide = make_sae(d_in=48, model=lm.name)
    with pytest.raises(MonoscopeError, match="width"):
        Steering(wide).clamp(1, 1.0).compile(lm)
    deep = make_sae(hook="resid_post.7", model=lm.name)
    with pytest.raises(MonoscopeError, match="layers"):
        Steering(deep).clamp(1, 1.0).compile(lm)
    other = make_sae(model=str(tiny_gpt2_dir))
    with pytest.warns(SteeringWarning, match="trained on"):
        Steering(other).clamp(1, 1.0).compile(lm)
    with pytest.raises(MonoscopeError, match="strength"):
        Steering(sae).strength = float("nan")
    with pytest.raises(MonoscopeError, match="width"):
        Steering().add_vector(torch.ones(7), 1.0, hook=HOOK).compile(lm)
    with pytest.raises(MonoscopeError, match="max activation"):
        Steering(sae, max_activations={}).clamp(3, "8x").compile(lm)


def test_saved_sae_steers_and_max_activation_is_estimated_without_a_database(lm, ids, tmp_path):
    from monoscope.steer import load_steering_sae

    folder = save_sae(
        make_sae(model=lm.name, always_on=2), tmp_path / "sae", info={"hook_point": HOOK, "model": lm.name}
    )
    sae = load_steering_sae(folder)
    with pytest.warns(UserWarning, match="estimated"):
        compiled = Steering(sae).clamp(2, "2x").compile(lm)
    value = float(compiled.plans[HOOK].groups[0].values[0])
    assert value > 0


def test_values_and_suggestions_from_a_feature_database(lm, tmp_path, text_corpus):
    from monoscope.features.analyze import AnalysisConfig, analyze_sae
    from monoscope.features.store import FeatureStore
    from monoscope.steer import FeatureDB, load_steering_sae, suggest_features

    folder = save_sae(
        make_sae(model=lm.name, always_on=2), tmp_path / "sae", info={"hook_point": HOOK, "model": lm.name}
    )
    analyze_sae(
        folder,
        loaded=lm,
        corpus=str(text_corpus),
        config=AnalysisConfig(tokens=600, context_size=16, map="none", embeddings=False),
        progress=False,
    )
    sae = load_steering_sae(folder)
    store = FeatureStore.for_sae(folder)
    fired = [r.id for r in store.features() if r.max_activation > 0][:2]
    compiled = (
        Steering(sae).clamp(fired[0], "2x").add(fired[1], "0.5x").compile(lm)
    )  # the database next to the SAE, no estimate
    values = compiled.plans[HOOK].groups[0].values.tolist()
    assert values == pytest.approx(
        [2 * store.feature(fired[0]).max_activation, 0.5 * store.feature(fired[1]).max_activation]
    )
    found = suggest_features(lm, sae, "the quick brown fox", db=FeatureDB(store), top=3, search_mode="words")
    assert found and all(s.source in ("search", "examples") for s in found)
    with pytest.raises(MonoscopeError, match="another SAE"):
        Steering(make_sae(d_sae=32, model=lm.name), max_activations=store.path).clamp(1, "2x").compile(lm)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard"])
def test_feature_codes_match_encode_for_every_architecture(arch):
    from monoscope.sae import JumpReLUSAE, ReLUSAE
    from monoscope.steer import feature_codes

    cls = {"topk": TopKSAE, "jumprelu": JumpReLUSAE, "standard": ReLUSAE}[arch]
    sae = cls(SAEConfig(d_in=32, d_sae=64, architecture=arch, k=4 if arch == "topk" else None))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g).abs() * 0.3 if p.dim() == 1 else torch.randn(p.shape, generator=g)
            )
    x = torch.randn(10, 32, generator=g)
    idx = torch.tensor([5, 0, 63, 17])
    assert torch.allclose(feature_codes(sae, x, idx), sae.encode(x)[:, idx], atol=1e-5)


def test_past_length_reads_real_caches_and_refuses_to_guess():
    """Position-scoped edits place themselves by the cache's length: a cache it cannot read is an error, not 0."""
    from transformers import DynamicCache

    from monoscope.steer.steering import _past_length

    cache = DynamicCache()
    assert _past_length(None) == 0 and _past_length(cache) == 0
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), layer_idx=0)
    assert _past_length(cache) == 5
    assert _past_length(((torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)),)) == 7
    with pytest.raises(MonoscopeError, match="KV cache"):
        _past_length(object())
