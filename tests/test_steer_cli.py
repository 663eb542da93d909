"""The intervention commands: `steer --json` and `chat` as real subprocesses, the others in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.test_steer_core import make_sae

from monoscope.cli import main
from monoscope.model import load_model
from monoscope.sae import save_sae

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def sae_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("steer-sae") / "sae"
    return save_sae(
        make_sae(model=str(tiny_llama_dir), always_on=0),
        folder,
        info={"hook_point": "resid_post.0", "model": str(tiny_llama_dir)},
    )


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "monoscope", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def test_steer_json_unsteered_equals_plain_greedy_generate(sae_dir, tiny_llama_dir):
    proc = run_cli(
        "steer",
        "--sae",
        str(sae_dir),
        "--feature",
        "3=clamp:4",
        "--feature",
        "7=add:2.5",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt"] == PROMPT and out["chat_template"] is False
    lm = load_model(str(tiny_llama_dir))
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    plain = lm.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    assert out["unsteered"] == lm.tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)
    assert out["steered"] != out["unsteered"]
    assert [f["feature"] for f in out["features"]] == [3, 7]


def test_chat_driven_through_stdin(sae_dir):
    script = (
        "\n".join(
            [
                "hello there",
                "/set 0 8x",
                "/set 5 add:3",
                "/set 999 4",
                "/list",
                "/strength 0.5",
                "what now",
                "/off 0",
                "/reset",
                "/list",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    proc = run_cli("chat", "--sae", str(sae_dir), "--max-new-tokens", "6", stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("model> ") == 2
    assert "set 0=clamp:8x" in out and "set 5=add:3" in out
    assert "error: feature id 999 does not exist" in out
    list_block = out.split("you> /list", 1)[1].split("you> /strength", 1)[0]
    assert "0=clamp:8x" in list_block and "5=add:3" in list_block and "strength 1" in list_block
    assert "strength 0.5" in out and "removed 0" in out and "equalizer reset" in out
    assert "equalizer: flat" in out.split("equalizer reset", 1)[1]
    assert "never read" not in out and out.rstrip().endswith("bye")
    assert "estimated" in proc.stderr  # no feature database: 8x came from an estimate, said loudly


def test_attribute_suggest_vector_and_ablate_commands(sae_dir, tiny_llama_dir, tmp_path, capsys):
    assert (
        main(["attribute", "--sae", str(sae_dir), "--prompt", PROMPT, "--target", " Paris", "--top", "5", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == " Paris" and 0 < len(result["features"]) <= 5
    assert main(["attribute", "--sae", str(sae_dir), "--prompt", PROMPT, "--target", " Paris"]) == 0
    assert "attribution" in capsys.readouterr().out

    assert main(["suggest", "--sae", str(sae_dir), "the quick brown fox", "--top", "3", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert 1 <= len(found) <= 3 and {
        "feature",
        "score",
        "gain",
        "neutral_gain",
        "label",
        "similarity",
        "chosen",
    } <= set(found[0])
    assert found[0]["chosen"] or found[0]["similarity"] is not None  # the chosen option first, else the best measured

    vec = tmp_path / "fox.safetensors"
    assert (
        main(
            [
                "vector",
                "make",
                "--model",
                str(tiny_llama_dir),
                "--positive",
                "The quick brown fox",
                "--positive",
                "A fox jumps",
                "--negative",
                "def add(a, b):",
                "--negative",
                "import os",
                "--hook",
                "resid_post.1",
                "--out",
                str(vec),
            ]
        )
        == 0
    )
    assert vec.is_file() and vec.with_suffix(".json").is_file()
    assert main(["vector", "export-gguf", str(vec), "--out", str(tmp_path / "fox.gguf")]) == 0
    from monoscope.steer import read_gguf

    meta, directions = read_gguf(tmp_path / "fox.gguf")
    assert meta["general.architecture"] == "controlvector" and list(directions) == [1]
    capsys.readouterr()
    assert (
        main(
            [
                "steer",
                "--vector",
                f"{vec}:2",
                "--model",
                str(tiny_llama_dir),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["vectors"]

    out_dir = tmp_path / "ablated"
    assert (
        main(
            [
                "ablate-direction",
                "--vector",
                str(vec),
                "--model",
                str(tiny_llama_dir),
                "--out",
                str(out_dir),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert (out_dir / "config.json").is_file() and "original" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--feature", "3=clamp:nan"], "finite"),
        (["--feature", "3=clamp:1e9"], "beyond"),
        (["--feature", "64=clamp:2"], "does not exist"),
        (["--feature=-1=clamp:2"], "negative"),
        (["--feature", "x=clamp:2"], "cannot read feature spec"),
        (["--feature", "3=clamp"], "no value"),
        (["--feature", "3=boost:2"], "unknown steering mode"),
        (["--feature", "3=clamp:2", "--when", "zz"], "cannot read condition"),
        (["--feature", "3=clamp:2", "--prompt", "  "], "prompt is empty"),
    ],
)
def test_bad_steer_input_exits_2_with_one_line_before_any_generation(sae_dir, capsys, args, message):
    base = ["steer", "--sae", str(sae_dir), "--max-new-tokens", "4"]
    if "--prompt" not in args:
        base += ["--prompt", PROMPT]
    assert main(base + args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("monoscope: error:") and message in err and "\n" not in err


def test_sae_for_another_model_is_an_error_and_a_name_mismatch_warns(sae_dir, tiny_gpt2_dir, tmp_path, capsys):
    wide = save_sae(make_sae(d_in=48, model="x"), tmp_path / "wide", info={"hook_point": "resid_post.0", "model": "x"})
    assert (
        main(["steer", "--sae", str(wide), "--model", str(sae_dir.parent), "--feature", "3=clamp:2", "--prompt", "hi"])
        == 2
    )
    assert "monoscope: error:" in capsys.readouterr().err
    assert (
        main(
            [
                "steer",
                "--sae",
                str(sae_dir),
                "--model",
                str(tiny_gpt2_dir),
                "--feature",
                "3=clamp:2",
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "3",
                "--json",
            ]
        )
        == 0
    )
    assert "monoscope: warning: this SAE was trained on" in capsys.readouterr().err
    deep = save_sae(make_sae(hook="resid_post.5", model="x"), tmp_path / "deep", info={"hook_point": "resid_post.5"})
    assert (
        main(["steer", "--sae", str(deep), "--model", str(tiny_gpt2_dir), "--feature", "3=clamp:2", "--prompt", "hi"])
        == 2
    )
    assert "layers" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible(sae_dir, capsys):
    args = [
        "steer",
        "--sae",
        str(sae_dir),
        "--feature",
        "7=add:1.5",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--json",
    ]
    outs = []
    for _ in range(2):
        assert main(args) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and outs[0]["seed"] == 3


@pytest.mark.parametrize(
    "scale,message", [("0", "finite number > 0"), ("nan", "finite number, got nan"), ("x", "expected a number")]
)
def test_bad_suggest_scale_exits_2_with_one_line(sae_dir, capsys, scale, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["suggest", "--sae", str(sae_dir), "the quick brown fox", "--scale", scale])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("monoscope suggest: error: argument --scale") and message in err
