"""The trainer: learning on synthetic data, constraints, validation, NaN and disk-full handling, exact resume,
several SAEs from one stream."""

from __future__ import annotations

import errno
import json
import signal

import pytest
import torch

import monoscope._io
from monoscope.errors import MonoscopeError
from monoscope.sae import (
    BatchTopKConfig,
    OptimizerConfig,
    TrainConfig,
    default_lr,
    evaluate_reconstruction,
    load_sae,
    load_train_log,
    train_from_batches,
    train_sae,
    train_saes,
)
from monoscope.sae.synthetic import SyntheticActivations


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


D_IN, D_SAE, BATCH = 32, 128, 256


@pytest.fixture(scope="module")
def data() -> SyntheticActivations:
    return SyntheticActivations(d_in=D_IN, n_features=128, active_per_token=4, chunk_size=BATCH, n_chunks=200, seed=1)


@pytest.fixture(scope="module")
def held_out(data) -> torch.Tensor:
    return torch.cat([data.sample(100_000 + i, 512) for i in range(2)])


def same_parameters(a, b) -> bool:
    return all(torch.allclose(a.state_dict()[n], b.state_dict()[n], atol=1e-6, rtol=1e-5) for n in a.state_dict())


@pytest.mark.parametrize(
    "arch,extra",
    [("topk", {}), ("batchtopk", {}), ("jumprelu", {}), ("relu", {"l1_coefficient": 1.0})],
)
def test_each_architecture_learns(tmp_path, data, held_out, arch, extra):
    result = train_from_batches(
        data, tmp_path, tokens=BATCH * 150, d_sae=D_SAE, k=6, arch=arch, batch_size=BATCH, progress=False, **extra
    )
    assert result.complete and result.steps == 150
    metrics = evaluate_reconstruction(result.sae, [held_out])
    assert metrics.fvu < 0.45, metrics
    assert metrics.frac_alive > 0.9
    log = load_train_log(tmp_path)
    assert [row["step"] for row in log] == list(range(1, 151))
    for key in ("step", "tokens", "loss", "mse", "fvu", "l0", "dead_frac", "lr"):
        assert key in log[-1]
    assert log[-1]["tokens"] == 150 * BATCH
    assert sum(row["fvu"] for row in log[-10:]) / 10 < 0.6 * sum(row["fvu"] for row in log[:10]) / 10
    if arch in ("topk", "batchtopk"):
        assert "aux_loss" in log[-1]
    if arch == "topk":
        assert metrics.l0 <= 6 and all(row["l0"] <= 6 for row in log)


def test_batchtopk_threshold_gives_mean_l0_near_k(tmp_path, data, held_out):
    result = train_from_batches(
        data, tmp_path, tokens=BATCH * 200, d_sae=D_SAE, k=6, arch="batchtopk", batch_size=BATCH, progress=False
    )
    assert result.sae.cfg.architecture == "jumprelu"
    thresholds = result.sae.threshold
    assert torch.all(thresholds == thresholds[0]) and thresholds[0] > 0
    l0 = evaluate_reconstruction(result.sae, [held_out]).l0
    assert 6 * 0.7 < l0 < 6 * 1.3, l0


def test_jumprelu_with_a_target_l0_starts_and_stays_near_it(tmp_path, data, held_out):
    free = train_from_batches(
        data, tmp_path / "free", tokens=BATCH * 60, d_sae=D_SAE, k=6, arch="jumprelu", batch_size=BATCH, progress=False
    )
    config = TrainConfig(
        d_in=D_IN, d_sae=D_SAE, architecture="jumprelu", target_l0=6.0, total_tokens=BATCH * 60, batch_size=BATCH
    )
    targeted = train_sae(config, data, tmp_path / "targeted", progress=False)
    log = load_train_log(tmp_path / "targeted")
    assert 6 * 0.6 < log[0]["l0"] < 6 * 1.6  # the thresholds start where 6 latents fire per token
    metrics = evaluate_reconstruction(targeted.sae, [held_out])
    assert 6 * 0.6 < metrics.l0 < 6 * 1.6, metrics.l0
    assert metrics.fvu < 0.5
    assert abs(evaluate_reconstruction(free.sae, [held_out]).l0 - 6) > abs(
        metrics.l0 - 6
    )  # the plain penalty lands elsewhere


def test_decoder_rows_stay_unit_norm_and_lr_follows_the_schedule(tmp_path, data):
    result = train_from_batches(
        data,
        tmp_path,
        tokens=BATCH * 40,
        d_sae=D_SAE,
        k=4,
        batch_size=BATCH,
        progress=False,
        optimizer=OptimizerConfig(name="adam", warmup_steps=5),
    )
    norms = result.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    lrs = [row["lr"] for row in load_train_log(tmp_path)]
    peak = default_lr("adam", D_SAE)
    assert lrs[0] == pytest.approx(peak / 5)  # warm-up over 5 steps
    assert lrs[4:33] == [pytest.approx(peak)] * 29  # flat
    assert lrs[33] < peak and lrs[-1] == pytest.approx(peak / 8)  # linear decay over the last 20% (8 steps)
    assert all(a > b for a, b in zip(lrs[32:], lrs[33:]))


def test_activation_scale_is_folded_into_the_saved_sae(tmp_path, data, held_out):
    scale = 0.2  # the stream holds scale * raw activations
    result = train_from_batches(
        data,
        tmp_path,
        tokens=BATCH * 30,
        d_sae=D_SAE,
        k=4,
        batch_size=BATCH,
        progress=False,
        activation_scale=scale,
        info={"model_name": "toy"},
    )
    raw = held_out / scale
    # unit-norm decoder rows in the training space become rows of norm 1/scale in raw units
    norms = result.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 1 / scale), rtol=1e-4)
    on_raw = evaluate_reconstruction(result.sae, [raw])
    assert on_raw.fvu < 0.9
    unfolded = load_sae(tmp_path)
    unfolded.fold_activation_scale(1 / scale)  # back to the space it was trained in
    assert torch.allclose(unfolded(held_out), result.sae(raw) * scale, atol=1e-4)
    assert evaluate_reconstruction(unfolded, [held_out]).fvu == pytest.approx(on_raw.fvu, rel=1e-4)
    loaded = load_sae(tmp_path)
    assert loaded.info["activation_scale"] == scale and loaded.info["activation_scale_folded"] is True
    assert loaded.info["training"]["steps"] == 30 and loaded.info["model_name"] == "toy"
    assert torch.equal(loaded(raw), result.sae(raw))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"k": 128}, "k=128 must be smaller than d_sae=128"),
        ({"k": 0}, "k must be at least 1"),
        ({"architecture": "gated"}, "unknown SAE architecture 'gated'; choose one of topk, batchtopk, jumprelu, relu"),
        ({"optimizer": {"lr": -1.0}}, "learning rate must be positive"),
        ({"optimizer": {"lr": 0.0}}, "learning rate must be positive"),
        ({"optimizer": {"name": "sgd"}}, "unknown optimizer 'sgd'; choose one of adam, signum, adam_sf"),
        ({"total_tokens": 0}, "training tokens must be positive"),
        ({"batch_size": 0}, "batch size must be a positive integer"),
        ({"total_tokens": 100}, "must be at least one batch"),
        ({"d_sae": None}, "give the SAE width"),
        ({"expansion_factor": 2.0}, "disagrees with expansion factor"),
        ({"target_l0": 4.0}, "target_l0 is for the jumprelu architecture"),
        ({"target_l0": 0.0, "architecture": "jumprelu"}, "target_l0 must be in (0, d_sae=128)"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    base = {"d_in": D_IN, "d_sae": D_SAE, "total_tokens": 1024, "batch_size": BATCH, "k": 4}
    with pytest.raises(MonoscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{**base, **kwargs})


def test_expansion_factor_and_default_rules():
    cfg = TrainConfig(d_in=64, expansion_factor=4, total_tokens=20 * 4096)
    assert cfg.d_sae == 256
    assert cfg.lr == pytest.approx(8e-4 / (256 / 2**14) ** 0.5) and cfg.optim.name == "adam"
    assert cfg.arch.aux_k == 32 and cfg.optim.warmup_steps == 1 and cfg.dead_tokens == 4096
    relu = TrainConfig(d_in=64, expansion_factor=4, total_tokens=20 * 4096, architecture="relu")
    assert relu.lr == pytest.approx(2e-4 / (256 / 2**14) ** 0.5)  # JumpReLU and ReLU keep Gao et al.'s rule
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_width_mismatch_with_the_data_is_a_clear_error(tmp_path, data):
    cfg = TrainConfig(d_in=48, d_sae=D_SAE, k=4, total_tokens=BATCH * 4, batch_size=BATCH)
    with pytest.raises(MonoscopeError, match="activations for .* have d=32 but the SAE expects d_in=48"):
        train_sae(cfg, data, tmp_path, progress=False)


@pytest.mark.parametrize(
    "check_every,message",
    [
        (None, r"step 13: .*NaN or inf.*last good checkpoint .*step-000000010"),  # CPU: the loss is read every step
        # as on a GPU, where it is read back every few steps: the NaN of step 13 is found at step 15, before the
        # checkpoint due then is written, and the error still names step 13
        (8, r"step 13 of 'sae': the loss became NaN or inf.*last good checkpoint .*step-000000010"),
    ],
)
def test_nan_batch_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, data, check_every, message):
    chunks = [data.chunk(i) for i in range(20)]
    chunks[12] = chunks[12].clone()
    chunks[12][7, 3] = float("nan")
    cfg = TrainConfig(d_in=D_IN, d_sae=D_SAE, k=4, total_tokens=BATCH * 20, batch_size=BATCH)
    with pytest.raises(MonoscopeError, match=message):
        train_sae(
            cfg, chunks, tmp_path, progress=False, checkpoint_every_tokens=BATCH * 5, finite_check_steps=check_every
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000005", "step-000000010"]
    chunks[12] = data.chunk(12)
    result = train_sae(
        cfg, chunks, tmp_path, progress=False, checkpoint_every_tokens=BATCH * 5, finite_check_steps=check_every
    )
    assert result.complete and result.steps == 20
    assert not (tmp_path / "checkpoints").exists()


def test_a_diverging_loss_stops_with_the_step(tmp_path, data):
    cfg = TrainConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, total_tokens=BATCH * 20, batch_size=BATCH, optimizer={"name": "adam", "lr": 1e30}
    )
    with pytest.raises(MonoscopeError, match=r"step \d+ of 'sae': the loss became (nan|inf).*lower learning rate"):
        train_sae(cfg, data, tmp_path, progress=False)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    cfg = TrainConfig(d_in=D_IN, d_sae=D_SAE, k=4, total_tokens=BATCH * 20, batch_size=BATCH)
    real_save = monoscope._io.save_file
    calls = {"n": 0}

    def save_until_disk_is_full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint writes 2 files; the next one finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(monoscope._io, "save_file", save_until_disk_is_full)
    with pytest.raises(MonoscopeError, match="No space left on device"):
        train_sae(cfg, data, tmp_path, progress=False, checkpoint_every_tokens=BATCH * 5)
    monkeypatch.setattr(monoscope._io, "save_file", real_save)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000005"]
    assert not list((tmp_path / "checkpoints" / "step-000000005").glob(".*tmp"))
    resumed = train_sae(cfg, data, tmp_path, progress=False, checkpoint_every_tokens=BATCH * 5)
    uninterrupted = train_sae(cfg, data, tmp_path / "other", progress=False)
    assert same_parameters(resumed.sae, uninterrupted.sae)


class Interrupted:
    """Yields the chunks, but the first pass is cut off at chunk `stop_at` like a Ctrl-C."""

    def __init__(self, chunks, stop_at: int, how: str, restartable: bool) -> None:
        self.chunks, self.stop_at, self.how, self.passes = chunks, stop_at, how, 0
        if restartable:
            self.iter_from = lambda index: self._iterate(index)

    def _iterate(self, start: int):
        self.passes += 1
        first_pass = self.passes == 1
        for index in range(start, len(self.chunks)):
            if first_pass and index == self.stop_at:
                if self.how == "exception":
                    raise KeyboardInterrupt
                signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, handled by the trainer
            yield self.chunks[index]

    def __iter__(self):
        return self._iterate(0)


@pytest.mark.parametrize(
    "arch,how,restartable,optimizer",
    [
        ("topk", "exception", False, None),
        ("topk", "sigint", True, None),
        ("batchtopk", "exception", True, None),
        ("topk", "exception", True, "adam"),
        ("topk", "sigint", True, "adam_sf"),
    ],
)
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, data, arch, how, restartable, optimizer):
    # Chunks of 96 rows are re-cut into batches of 128, so the resume point falls inside a chunk.
    chunks = [data.sample(i, 96) for i in range(60)]
    cfg = TrainConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=4,
        architecture=arch,
        total_tokens=128 * 40,
        batch_size=128,
        dead_tokens=128 * 2,
        seed=3,  # small dead_tokens: AuxK state is part of what must resume
        optimizer={"name": optimizer} if optimizer else None,
    )
    reference = train_sae(cfg, chunks, tmp_path / "reference", progress=False)
    source = Interrupted(chunks, stop_at=23, how=how, restartable=restartable)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, source, tmp_path / "run", progress=False, checkpoint_every_tokens=128 * 7)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    # chunk 23 starts at row 2208: an exception there stops after 17 whole batches; a Ctrl-C lets the
    # current batch finish (step 18). Either way the checkpoint is taken then, not only every 7 steps.
    assert checkpoints[-1] == ("step-000000017" if how == "exception" else "step-000000018")
    resumed = train_sae(cfg, source, tmp_path / "run", progress=False, checkpoint_every_tokens=128 * 7)
    assert resumed.steps == reference.steps == 40
    for name, value in reference.sae.state_dict().items():  # bit for bit: optimiser state and counters included
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    log = load_train_log(tmp_path / "run")
    assert [row["step"] for row in log] == list(range(1, 41))
    reference_log = load_train_log(tmp_path / "reference")
    assert log[-1]["loss"] == pytest.approx(reference_log[-1]["loss"], rel=1e-4)


def test_resume_refuses_a_different_config(tmp_path, data):
    cfg = TrainConfig(d_in=D_IN, d_sae=D_SAE, k=4, total_tokens=BATCH * 10, batch_size=BATCH)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, Interrupted([data.chunk(i) for i in range(10)], 6, "exception", False), tmp_path, progress=False)
    other = TrainConfig(d_in=D_IN, d_sae=D_SAE, k=5, total_tokens=BATCH * 10, batch_size=BATCH)
    with pytest.raises(MonoscopeError, match="config differs in .*k"):
        train_sae(other, data, tmp_path, progress=False)
    with pytest.raises(MonoscopeError, match="already holds checkpoints"):
        train_sae(cfg, data, tmp_path, progress=False, resume=False)


#: A BatchTopK config as monoscope wrote it before the architecture's settings were nested (b59dec9): flat,
#: with every architecture's fields at the top level, in train_config.json, checkpoints and monoscope.json.
FLAT_BATCHTOPK = {
    "d_in": 32,
    "total_tokens": 2560,
    "d_sae": 128,
    "expansion_factor": None,
    "architecture": "batchtopk",
    "k": 4,
    "batch_size": 256,
    "seed": 0,
    "hook_name": "",
    "activation_scale": 1.0,
    "optimizer": {
        "name": "adam",
        "lr": 0.009050966799187809,
        "warmup_steps": 1,
        "decay_fraction": 0.2,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 6.25e-10,
        "momentum": 0.95,
    },
    "max_grad_norm": 0.0,
    "geometric_median_iters": 10,
    "decoder_init_norm": 1.0,
    "dead_tokens": 256,
    "aux_k": 16,
    "aux_coefficient": 0.03125,
    "multi_topk": False,
    "multi_topk_coefficient": 0.125,
    "threshold_ema": 0.1,
    "l1_coefficient": 5.0,
    "l1_warmup_fraction": 0.05,
    "l0_coefficient": 1.0,
    "jumprelu_bandwidth": 0.05,
    "jumprelu_init_threshold": 0.5,
    "target_l0": None,
    "bf16_autocast": True,
}


def test_flat_configs_written_before_the_nesting_load_and_resume(tmp_path, data):
    cfg = TrainConfig.from_dict(FLAT_BATCHTOPK)
    assert cfg == TrainConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, architecture="batchtopk", total_tokens=BATCH * 10, batch_size=BATCH
    )
    assert cfg.arch == BatchTopKConfig(k=4, aux_k=16, threshold_ema=0.1)  # the other architectures' fields are dropped
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and "arch" in cfg.to_dict() and "k" not in cfg.to_dict()
    chunks = [data.chunk(i) for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, Interrupted(chunks, 6, "exception", False), tmp_path, progress=False)
    state_path = sorted((tmp_path / "checkpoints").iterdir())[-1] / "state.json"
    state = json.loads(state_path.read_text())
    state["runs"]["sae"]["config"] = FLAT_BATCHTOPK  # the checkpoint as the older version wrote it
    state_path.write_text(json.dumps(state))
    resumed = train_sae(cfg, chunks, tmp_path, progress=False)
    assert resumed.complete and resumed.steps == 10
    info = json.loads((tmp_path / "monoscope.json").read_text())
    info["training"]["config"] = FLAT_BATCHTOPK  # a finished SAE of the older version is adopted, not retrained
    (tmp_path / "monoscope.json").write_text(json.dumps(info))
    assert train_sae(cfg, chunks, tmp_path, progress=False).steps == 10


def test_several_saes_train_from_one_dict_stream(tmp_path, data):
    other = SyntheticActivations(d_in=24, n_features=96, active_per_token=3, chunk_size=200, n_chunks=100, seed=2)
    stream = [
        {"resid_post.1": data.sample(i, 200), "resid_post.2": other.chunk(i), "unused": torch.zeros(200, 3)}
        for i in range(60)
    ]
    configs = {
        "narrow": TrainConfig(
            d_in=D_IN, d_sae=64, k=4, total_tokens=BATCH * 40, batch_size=BATCH, hook_name="resid_post.1"
        ),
        "wide": TrainConfig(
            d_in=D_IN, d_sae=D_SAE, k=8, total_tokens=BATCH * 40, batch_size=BATCH, hook_name="resid_post.1"
        ),
        "second": TrainConfig(
            d_in=24,
            d_sae=96,
            k=4,
            total_tokens=BATCH * 25,
            batch_size=BATCH,
            hook_name="resid_post.2",
            architecture="batchtopk",
        ),
    }
    results = train_saes(configs, stream, tmp_path, progress=False)
    assert set(results) == {"narrow", "wide", "second"}
    assert results["second"].steps == 25 and results["wide"].steps == 40
    for name, result in results.items():
        loaded = load_sae(tmp_path / name)
        assert loaded.cfg.d_sae == configs[name].d_sae
        assert loaded.info["hook_name"] == configs[name].hook_name
        assert len(load_train_log(tmp_path / name)) == result.steps
    assert json.loads((tmp_path / "second" / "cfg.json").read_text())["architecture"] == "jumprelu"
    alone = train_sae(configs["wide"], [chunk["resid_post.1"] for chunk in stream], tmp_path / "alone", progress=False)
    assert same_parameters(alone.sae, results["wide"].sae)  # training together changes nothing
    with pytest.raises(MonoscopeError, match="no 'resid_post.9'"):
        bad = {
            "x": TrainConfig(d_in=D_IN, d_sae=64, k=4, total_tokens=BATCH, batch_size=BATCH, hook_name="resid_post.9")
        }
        train_saes(bad, stream, tmp_path / "bad", progress=False)
    with pytest.raises(MonoscopeError, match="share the batch size"):
        mixed = {"a": configs["narrow"], "b": TrainConfig(d_in=D_IN, d_sae=64, k=4, total_tokens=1024, batch_size=128)}
        train_saes(mixed, stream, tmp_path / "mixed", progress=False)


def test_short_stream_saves_what_was_trained(tmp_path, data):
    chunks = [data.chunk(i) for i in range(8)]
    with pytest.warns(UserWarning, match="stream ended after 2048 tokens"):
        result = train_from_batches(
            iter(chunks), tmp_path, tokens=BATCH * 20, d_sae=D_SAE, k=4, batch_size=BATCH, progress=False
        )
    assert not result.complete and result.steps == 8
    assert load_sae(tmp_path).info["training"]["complete"] is False


def test_held_out_evaluation_during_training_is_logged_and_matches_the_saved_sae(tmp_path, data, held_out):
    configs = {
        arch: TrainConfig(d_in=D_IN, d_sae=D_SAE, k=6, architecture=arch, total_tokens=BATCH * 40, batch_size=BATCH)
        for arch in ("topk", "batchtopk")
    }
    results = train_saes(configs, data, tmp_path, held_out=held_out, eval_every_tokens=BATCH * 10, progress=False)
    for name, result in results.items():
        evaluated = [row for row in load_train_log(tmp_path / name) if "held_out_fvu" in row]
        assert [row["step"] for row in evaluated] == [10, 20, 30, 40]
        assert evaluated[-1]["held_out_fvu"] < evaluated[0]["held_out_fvu"]  # it learns, on data it never saw
        final = evaluate_reconstruction(
            result.sae, [held_out]
        )  # the saved (inference) SAE gives the last logged figures
        assert evaluated[-1]["held_out_fvu"] == pytest.approx(final.fvu, rel=1e-4, abs=1e-6)
        assert evaluated[-1]["held_out_l0"] == pytest.approx(final.l0, rel=1e-4)
        assert result.final_metrics["held_out_fvu"] == evaluated[-1]["held_out_fvu"]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"eval_every_tokens": 1024}, "needs held-out activations"),
        ({"held_out": torch.zeros(10, D_IN + 1)}, r"must be \[tokens, 32\]"),
        ({"held_out": {"resid_post.3": torch.zeros(10, D_IN)}}, "no held-out activations"),
        ({"held_out": torch.zeros(10, D_IN), "eval_every_tokens": 0}, "positive number of tokens"),
    ],
)
def test_bad_held_out_options_are_clear_errors(tmp_path, data, options, message):
    config = TrainConfig(
        d_in=D_IN, d_sae=D_SAE, k=6, total_tokens=BATCH * 4, batch_size=BATCH, hook_name="resid_post.1"
    )
    with pytest.raises(MonoscopeError, match=message):
        train_saes({"a": config}, data, tmp_path, progress=False, **options)
