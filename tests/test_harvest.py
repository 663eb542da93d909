"""Harvesting into a cache: exact round trip, stored normalisation, resume after interruption, reading back."""

from __future__ import annotations

import math

import pytest
import torch

from monoscope.data import ActivationCache, ActivationStream, HarvestConfig, Harvester, ShuffleBuffer, harvest_to_cache
from monoscope.data.packing import batched_contexts, pack_contexts
from monoscope.errors import MonoscopeError
from monoscope.model import find_blocks, load_model, run_to


def config(model_dir, corpus, **overrides) -> HarvestConfig:
    values = dict(
        model=str(model_dir),
        hook_points=["resid_post.0", "mlp_out.1"],
        corpus=str(corpus),
        tokens=1500,
        context_size=16,
        batch_size=4,
        shard_tokens=400,
        cache_dtype="float32",
        norm_sample_tokens=300,
    )
    values.update(overrides)
    return HarvestConfig(**values)


def test_cache_round_trip_is_exact_and_drops_bos(tiny_llama_dir, text_corpus, tmp_path):
    cfg = config(tiny_llama_dir, text_corpus)
    loaded = load_model(str(tiny_llama_dir))
    report = harvest_to_cache(cfg, tmp_path / "cache", loaded=loaded, show_progress=False)
    cache = ActivationCache(tmp_path / "cache")
    assert report.n_tokens == cache.n_tokens >= 1500 and cache.complete and len(cache.shards) >= 3
    # Recompute the same contexts directly and compare with what the cache holds.
    contexts = pack_contexts(cfg.open_corpus().documents(), loaded.tokenizer, 16)
    expected = {"resid_post.0": [], "mlp_out.1": []}
    token_ids = []
    for batch in batched_contexts(contexts, 4):
        acts = run_to(loaded.model, cfg.hook_points, batch)
        for name in expected:
            expected[name].append(acts[name][:, 1:].reshape(-1, 32))
        token_ids.append(batch[:, 1:].reshape(-1))
        if sum(t.numel() for t in token_ids) >= cache.n_tokens:
            break
    for name in expected:
        assert torch.equal(cache.read_all(name, normalize=False), torch.cat(expected[name])[: cache.n_tokens])
    stored_ids = torch.cat([cache.read_shard(i, column="token_ids") for i in range(len(cache.shards))])
    assert torch.equal(stored_ids.long(), torch.cat(token_ids)[: cache.n_tokens])
    bos = loaded.tokenizer.bos_token_id
    assert (stored_ids != bos).all(), "BOS positions are not harvested"
    positions = torch.cat([cache.read_shard(i, column="position") for i in range(len(cache.shards))])
    assert positions.min() == 1 and positions.max() == 15


def test_normalisation_is_stored_and_applied(tiny_llama_dir, text_corpus, tmp_path):
    cfg = config(tiny_llama_dir, text_corpus, cache_dtype="float16")
    harvest_to_cache(cfg, tmp_path / "c", show_progress=False)
    cache = ActivationCache(tmp_path / "c")
    for name in cfg.hook_points:
        scale = cache.manifest["scale_factors"][name]
        raw = cache.read_all(name, normalize=False)
        sample_norm = (raw[:300].float() * scale).norm(dim=-1).mean().item()
        assert sample_norm == pytest.approx(math.sqrt(32), rel=1e-2)
        assert torch.allclose(cache.read_all(name), raw.float() * scale)
    assert cache.read_shard(0, "resid_post.0").dtype == torch.float16


class _InterruptAfter:
    """A forward hook that interrupts the harvest like Ctrl-C after `n` forward passes."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, *args):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt


def test_interrupted_harvest_keeps_finished_shards_and_continues(tiny_llama_dir, text_corpus, tmp_path):
    cfg = config(tiny_llama_dir, text_corpus)
    full = tmp_path / "full"
    harvest_to_cache(cfg, full, show_progress=False)
    part = tmp_path / "part"
    loaded = load_model(str(tiny_llama_dir))
    handle = find_blocks(loaded.model)[0].register_forward_hook(_InterruptAfter(20))
    with pytest.raises(KeyboardInterrupt):
        harvest_to_cache(cfg, part, loaded=loaded, show_progress=False)
    handle.remove()
    partial = ActivationCache(part)
    assert not partial.complete and 0 < partial.n_tokens < 1500
    assert partial.read_all("resid_post.0").shape == (partial.n_tokens, 32), "every listed shard is whole"
    report = harvest_to_cache(cfg, part, show_progress=False)
    assert report.resumed and report.new_tokens > 0
    finished, reference = ActivationCache(part), ActivationCache(full)
    assert finished.complete and finished.n_tokens == reference.n_tokens
    for name in cfg.hook_points:
        assert torch.equal(finished.read_all(name), reference.read_all(name))
    again = harvest_to_cache(cfg, part, show_progress=False)
    assert again.already_complete and again.new_tokens == 0


def test_cache_from_another_harvest_is_refused(tiny_llama_dir, tiny_gpt2_dir, text_corpus, tmp_path):
    harvest_to_cache(config(tiny_llama_dir, text_corpus, tokens=300), tmp_path / "c", show_progress=False)
    with pytest.raises(MonoscopeError, match="holds a different harvest.*model"):
        harvest_to_cache(config(tiny_gpt2_dir, text_corpus, tokens=300), tmp_path / "c", show_progress=False)
    with pytest.raises(MonoscopeError, match="hook_points"):
        harvest_to_cache(
            config(tiny_llama_dir, text_corpus, tokens=300, hook_points=["resid_post.1"]),
            tmp_path / "c",
            show_progress=False,
        )


def test_bad_harvest_inputs(tiny_llama_dir, text_corpus, tmp_path):
    with pytest.raises(MonoscopeError, match="does not exist: the model has 2 layers"):
        harvest_to_cache(
            config(tiny_llama_dir, text_corpus, hook_points=["resid_post.99"]), tmp_path / "a", show_progress=False
        )
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    with pytest.raises(MonoscopeError, match="too small"):
        harvest_to_cache(config(tiny_llama_dir, tiny), tmp_path / "b", show_progress=False)
    with pytest.raises(MonoscopeError, match="tokens must be positive"):
        config(tiny_llama_dir, text_corpus, tokens=0)
    with pytest.raises(MonoscopeError, match="folder without config.json"):
        load_model(str(tmp_path))


def test_cache_batches_cover_each_row_once_per_epoch_and_resume_exactly(tiny_llama_dir, text_corpus, tmp_path):
    harvest_to_cache(config(tiny_llama_dir, text_corpus), tmp_path / "c", show_progress=False)
    cache = ActivationCache(tmp_path / "c")
    batches = cache.batches(100, "resid_post.0", seed=5, window_bytes=400 * 4 * 32)
    epoch = [b for _, b in zip(range(batches.batches_per_epoch), batches)]
    rows = torch.cat(epoch)
    everything = cache.read_all("resid_post.0")
    assert rows.shape == (batches.batches_per_epoch * 100, 32)
    assert cache.n_tokens == rows.shape[0], "1500 tokens make exactly 15 batches of 100"
    # One epoch emits every row of the cache exactly once (compared as multisets: repeated text repeats rows).
    seen, seen_counts = torch.unique(rows, dim=0, return_counts=True)
    held, held_counts = torch.unique(everything, dim=0, return_counts=True)
    assert torch.equal(seen, held) and torch.equal(seen_counts, held_counts)
    assert not torch.equal(rows, everything[: rows.shape[0]]), "batches are shuffled"
    stream = iter(batches)
    sequence = [next(stream) for _ in range(batches.batches_per_epoch + 3)]
    for start in (0, 2, batches.batches_per_epoch - 1, batches.batches_per_epoch + 1):
        assert torch.equal(next(batches.iter_from(start)), sequence[start])


def test_single_safetensors_file_of_activations(tmp_path):
    from safetensors.torch import save_file

    acts = torch.randn(500, 24) * 7
    save_file({"activations": acts}, str(tmp_path / "acts.safetensors"))
    cache = ActivationCache(tmp_path / "acts.safetensors")
    assert cache.d_model == 24 and cache.n_tokens == 500
    assert cache.read_all(normalize=False).equal(acts)
    normalised = cache.read_all()
    assert normalised.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(24), rel=1e-3)
    save_file({"x": acts}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(MonoscopeError, match="no 'activations' tensor"):
        ActivationCache(tmp_path / "bad.safetensors")


def test_shuffle_buffer_is_a_permutation_aligned_across_hook_points():
    buffer = ShuffleBuffer(capacity=64, seed=0)
    out = []
    for start in range(0, 200, 20):
        rows = torch.arange(start, start + 20).float()[:, None]
        buffer.add({"a": rows, "b": rows * 10})
        out += list(buffer.drain(8))
    out += list(buffer.flush(8))
    a = torch.cat([o["a"] for o in out]).flatten()
    b = torch.cat([o["b"] for o in out]).flatten()
    assert torch.equal(a * 10, b)
    assert len(set(a.tolist())) == a.numel() == 200
    assert not torch.equal(a, torch.arange(200).float())


def test_stream_from_the_model_is_normalised_and_restartable(tiny_llama_dir, text_corpus):
    cfg = config(tiny_llama_dir, text_corpus)
    loaded = load_model(str(tiny_llama_dir))
    harvester = Harvester(loaded, cfg.open_corpus(), ["resid_post.0"], context_size=16, batch_size=4)
    stream = ActivationStream(
        harvester, batch_size=64, shuffle_tokens=256, seed=0, max_tokens=640, norm_sample_tokens=300
    )
    batches = list(stream)
    assert len(batches) == 10 and all(b["resid_post.0"].shape == (64, 32) for b in batches)
    norm = torch.cat([b["resid_post.0"] for b in batches]).norm(dim=-1).mean().item()
    assert norm == pytest.approx(math.sqrt(32), rel=0.1)
    assert torch.equal(next(stream.iter_from(3))["resid_post.0"], batches[3]["resid_post.0"])
