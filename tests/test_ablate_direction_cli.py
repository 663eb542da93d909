"""Directional ablation at run time on a post-norm family (tiny Gemma 3 folder): `steer`/`chat`/`serve
--ablate-direction FILE` apply the hooked form, `ablate-direction --out` refuses with a pointer to it, and a
direction file that does not fit the model is one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.families import WIDTH, tiny_family
from tests.test_steer_cli import run_cli
from tests.test_steer_core import make_sae

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.model import load_model
from monoscope.sae import save_sae
from monoscope.steer import SteeringVector, generate
from monoscope.steer.ablation import directional_ablation

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def gemma_dir(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_family("gemma3_text", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def direction_file(gemma_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("direction")
    assert (
        main(
            [
                "vector",
                "make",
                "--model",
                str(gemma_dir),
                "--positive",
                "I love this, it is wonderful!",
                "--positive",
                "What a happy day.",
                "--negative",
                "I hate this, it is awful.",
                "--negative",
                "What a sad day.",
                "--hook",
                "resid_post.0",
                "--out",
                str(folder / "mood.safetensors"),
            ]
        )
        == 0
    )
    return folder / "mood.safetensors"


def test_steer_applies_the_hooked_ablation_and_out_refuses_on_gemma(gemma_dir, direction_file, tmp_path, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "steer",
                "--model",
                str(gemma_dir),
                "--ablate-direction",
                str(direction_file),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "8",
                "--raw",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["ablated_direction"] == "mood.safetensors (resid_post.0)"
    lm = load_model(str(gemma_dir))
    _, direction = SteeringVector.load(direction_file).direction()
    assert out["unsteered"] == generate(lm, PROMPT, max_new_tokens=8, raw=True).text
    with directional_ablation(lm.model, direction):
        assert out["steered"] == generate(lm, PROMPT, max_new_tokens=8, raw=True).text

    code = main(
        [
            "ablate-direction",
            "--model",
            str(gemma_dir),
            "--vector",
            str(direction_file),
            "--out",
            str(tmp_path / "baked"),
            "--prompt",
            PROMPT,
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "gemma3_text" in err
        and "steer --ablate-direction FILE" in err
        and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "baked").exists()


def test_chat_takes_the_ablation_too(gemma_dir, direction_file):
    proc = run_cli(
        "chat",
        "--model",
        str(gemma_dir),
        "--ablate-direction",
        f"{direction_file}:resid_post.0",
        "--max-new-tokens",
        "4",
        stdin="hello\n/quit\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "mood.safetensors (resid_post.0) ablated" in proc.stdout and "model> " in proc.stdout


def test_direction_files_that_do_not_fit_are_one_line(gemma_dir, tmp_path, capsys):
    SteeringVector({"resid_post.0": torch.ones(WIDTH + 1)}).save(tmp_path / "wide.safetensors")
    save_file({"resid_post.0": torch.zeros(WIDTH)}, str(tmp_path / "zero.safetensors"))
    save_file({"resid_post.0": torch.full((WIDTH,), float("nan"))}, str(tmp_path / "nan.safetensors"))
    SteeringVector({"resid_post.0": torch.ones(WIDTH), "resid_post.1": torch.ones(WIDTH)}).save(
        tmp_path / "two.safetensors"
    )
    cases = {
        "wide.safetensors": "33 numbers but the model's width is 32",
        "zero.safetensors": "zero",
        "nan.safetensors": "NaN",
        "two.safetensors": "pick one as",
        "absent.safetensors": "does not exist",
        "two.safetensors:resid_post.5": "no direction at resid_post.5",
    }
    for name, message in cases.items():
        capsys.readouterr()
        code = main(
            [
                "steer",
                "--model",
                str(gemma_dir),
                "--ablate-direction",
                str(tmp_path / name),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "2",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)


def test_served_model_is_ablated_for_every_request(gemma_dir, direction_file, tmp_path):
    from monoscope.server import Service

    folder = save_sae(
        make_sae(model=str(gemma_dir)), tmp_path / "sae", info={"hook_point": "resid_post.0", "model": str(gemma_dir)}
    )
    service = Service.load([str(folder)], ablate_direction=str(direction_file))
    try:
        assert service.info(auth=False).ablated_direction == "mood.safetensors (resid_post.0)"
        _, direction = SteeringVector.load(direction_file).direction()
        u = direction / direction.norm()
        ids = service.lm.tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = service.lm.model(ids, output_hidden_states=True).hidden_states
        assert float((hidden[1] @ u).abs().max()) < 1e-4 * float(hidden[1].norm(dim=-1).max())
    finally:
        service.close()
    with torch.no_grad():  # closing the service removes the hooks
        hidden = service.lm.model(ids, output_hidden_states=True).hidden_states
    assert float((hidden[1] @ u).abs().max()) > 1e-3
    SteeringVector({"resid_post.0": torch.ones(WIDTH + 1)}).save(tmp_path / "wide.safetensors")
    with pytest.raises(MonoscopeError, match="width is 32"):
        Service.load([str(folder)], ablate_direction=str(tmp_path / "wide.safetensors"))
