"""The CLI as users and scripts call it: --help, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monoscope", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["harvest"], ["quickstart"]])
def test_help_exits_zero(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: monoscope" in result.stdout


def test_harvest_contract_with_a_local_model(tiny_llama_dir, text_corpus, tmp_path):
    out = tmp_path / "cache"
    result = run_cli(
        "harvest",
        "--model",
        str(tiny_llama_dir),
        "--hook",
        "resid_post.1",
        "--corpus",
        str(text_corpus),
        "--tokens",
        "600",
        "--out",
        str(out),
        "--context-size",
        "16",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tokens"] >= 600 and summary["hook_points"] == ["resid_post.1"] and summary["d_model"] == 32
    manifest = json.loads((out / "activations.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] == summary["tokens"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hook", "resid_post.99"], "resid_post.99 does not exist: the model has 2 layers"),
        (["--hook", "resid_mid.1"], "cannot read hook point"),
        (["--corpus", "/nonexistent/corpus"], "neither 'starter'"),
    ],
)
def test_bad_input_gives_one_line_error(tiny_llama_dir, text_corpus, tmp_path, args, message):
    base = {
        "--model": str(tiny_llama_dir),
        "--corpus": str(text_corpus),
        "--out": str(tmp_path / "o"),
        "--tokens": "100",
    }
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    result = run_cli("harvest", *[x for kv in base.items() for x in kv])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("monoscope: error:") and message in lines[-1]


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    result = run_cli("harvest", "--model", str(tmp_path / "nope" / "model"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
