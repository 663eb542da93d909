"""Architectures as plugins: what the registry derives, and a new architecture added as one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from monoscope.errors import MonoscopeError
from monoscope.sae import TRAINING_ARCHITECTURES, JumpReLUConfig, ReLUConfig, TrainConfig, inference_class, registry


def test_tables_are_derived_from_the_registrations():
    assert TRAINING_ARCHITECTURES == registry.names() == ("topk", "batchtopk", "jumprelu", "relu")
    assert registry.saved_as() == {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}
    assert list(registry.inference_classes()) == ["topk", "jumprelu", "standard"]
    assert inference_class("relu") is inference_class("standard")  # a cfg.json may name the training form
    assert inference_class("batchtopk") is inference_class("jumprelu")


def test_nested_and_flat_construction_agree():
    nested = TrainConfig(d_in=16, d_sae=64, total_tokens=1024, batch_size=64, arch=JumpReLUConfig(target_l0=4.0))
    flat = TrainConfig(d_in=16, d_sae=64, total_tokens=1024, batch_size=64, architecture="jumprelu", target_l0=4.0)
    assert nested == flat and nested.architecture == "jumprelu"
    assert TrainConfig.from_dict(json.loads(json.dumps(nested.to_dict()))) == nested
    relu = TrainConfig(d_in=16, d_sae=64, total_tokens=4096, architecture="relu", arch={"l1_coefficient": 2.0})
    assert relu.arch == ReLUConfig(l1_coefficient=2.0) and relu.max_grad_norm == 1.0 and relu.decoder_init_norm == 0.1
    with pytest.raises(MonoscopeError, match="arch is a jumprelu config"):
        TrainConfig(d_in=16, d_sae=64, total_tokens=4096, architecture="relu", arch=JumpReLUConfig())
    with pytest.raises(MonoscopeError, match="l1_coefficient is for the relu architecture, not topk"):
        TrainConfig(d_in=16, d_sae=64, total_tokens=4096, l1_coefficient=2.0)


#: A whole new architecture in one file: ReLU with a plain (not decoder-norm-weighted) L1 penalty, saved as
#: SAELens's "standard", with its own config field and `monoscope train` flag.
PLUGIN = """
from dataclasses import dataclass

from torch import Tensor

from monoscope.sae.registry import ArchConfig, Architecture, CliFlag, register
from monoscope.sae.relu import ReLUSAE
from monoscope.sae.training import StepContext, StepOutput, TrainingSAE, copy_weights


@dataclass
class PlainL1Config(ArchConfig):
    penalty: float = 1.0
    apply_b_dec_to_input = False


class PlainL1TrainingSAE(TrainingSAE, ReLUSAE):
    training_architecture = "plainl1"

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        codes = self.pre_activations(x).relu()
        error = (x - codes @ self.W_dec - self.b_dec).pow(2).sum() / x.shape[0]
        loss = error + self.train_cfg.arch.penalty * codes.sum(-1).mean()
        return StepOutput(loss=loss, metrics={"loss": loss.detach(), "l0": (codes > 0).sum() / x.shape[0]},
                          fired=(codes > 0).any(0))

    def to_inference(self):
        return copy_weights(self, ReLUSAE(self.cfg))


register(Architecture(name="plainl1", saved_as="standard", config_class=PlainL1Config,
                      training_class=PlainL1TrainingSAE, description="ReLU with a plain L1 penalty",
                      k_meaning="unused by plainl1",
                      cli_flags=(CliFlag("--penalty", "penalty", float, "plainl1: weight of the L1 penalty"),)))
"""

RUN = """
import sys
import monoscope.sae
import plainl1_sae  # the one registration line
from monoscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_new_architecture_is_one_file_and_one_import(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "plainl1_sae.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "run.py").write_text(textwrap.dedent(RUN))
    save_file({"activations": torch.randn(512, 16)}, str(tmp_path / "acts.safetensors"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "MONOSCOPE_PROGRESS": "0"}
        return subprocess.run(
            [sys.executable, str(tmp_path / "run.py"), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            cwd=tmp_path,
            env=env,
        )

    help_text = cli("train", "--help").stdout
    assert "plainl1" in help_text and "--penalty" in help_text and "unused by plainl1" in help_text
    out = tmp_path / "sae"
    trained = cli(
        "train",
        "--activations",
        str(tmp_path / "acts.safetensors"),
        "--d-sae",
        "32",
        "--tokens",
        "512",
        "--batch-size",
        "64",
        "--arch",
        "plainl1",
        "--penalty",
        "0.5",
        "--out",
        str(out),
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "standard"  # SAELens reads it as its own
    config = json.loads((out / "train_config.json").read_text())
    assert config["architecture"] == "plainl1" and config["arch"] == {"penalty": 0.5}
    refused = cli(
        "train",
        "--activations",
        str(tmp_path / "acts.safetensors"),
        "--d-sae",
        "32",
        "--tokens",
        "512",
        "--penalty",
        "0.5",
        "--out",
        str(tmp_path / "other"),
    )
    assert refused.returncode == 2 and "--penalty is for --arch plainl1" in refused.stderr
