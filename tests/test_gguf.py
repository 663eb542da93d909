"""`--model FILE.gguf`: a GGUF file written in the test (tiny Llama, llama.cpp's layout) is dequantised once
into the cache under its content hash and gives the source model's logits; every way a file can be wrong
is one line; an interrupted conversion leaves no cache behind; the embedded model's own GGUF file, passed by
path, is the embedded model."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from tests.conftest import tiny_llama
from tests.tiny_gguf import write_llama_gguf

from monoscope.errors import MonoscopeError
from monoscope.model import gguf_files, load_model

TEXT = "def add(a, b):\n    return a + b\nThe quick brown fox"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("MONOSCOPE_HOME", str(folder))
    return folder


@pytest.fixture(scope="module")
def source(tokenizer):
    return tiny_llama(len(tokenizer), seed=3)


@pytest.fixture(scope="module")
def tiny_ggufs(source, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: write_llama_gguf(source, tokenizer, folder / f"tiny-{q}.gguf", q) for q in ("F32", "Q8_0")}


def _cached(home) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir() if p.is_dir()) if models.is_dir() else []


def test_gguf_file_loads_once_into_the_cache_with_the_source_logits(tiny_ggufs, source, tokenizer, home, capsys):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = source(ids).logits
    lm = load_model(str(tiny_ggufs["F32"]))
    assert "converting tiny-F32.gguf" in capsys.readouterr().err
    assert lm.name == str(tiny_ggufs["F32"]) and lm.d_model == 32 and lm.n_layers == 2
    assert lm.tokenizer(TEXT).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, expected, atol=1e-5)  # F32: lossless
    (folder,) = _cached(home)
    sha = gguf_files.file_sha256(tiny_ggufs["F32"])
    assert folder == f"gguf-{sha[:20]}"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((home / "models" / folder).stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((home / "models" / folder / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    record = json.loads((home / "models" / folder / "monoscope-gguf.json").read_text())
    assert record["architecture"] == "llama" and record["size"] == tiny_ggufs["F32"].stat().st_size
    assert (
        json.loads((home / "models" / "gguf-hashes.json").read_text())[str(tiny_ggufs["F32"].resolve())]["sha256"]
        == sha
    )

    again = load_model(str(tiny_ggufs["F32"]))  # from the cache: no second conversion
    assert "converting" not in capsys.readouterr().err
    assert torch.equal(again.model.lm_head.weight, lm.model.lm_head.weight)

    copy = shutil.copy(tiny_ggufs["F32"], home.parent / "renamed.gguf")  # same content, other name: same cache
    load_model(str(copy))
    assert "converting" not in capsys.readouterr().err and _cached(home) == [folder]

    q8 = load_model(str(tiny_ggufs["Q8_0"]))  # dequantised Q8_0 blocks: close to the source, not equal
    with torch.no_grad():
        err = (q8.model(ids).logits - expected).abs().max()
    assert 0 < float(err) < 0.05
    assert len(_cached(home)) == 2


def test_every_bad_file_is_one_clear_line(tiny_ggufs, source, tokenizer, home, tmp_path):
    data = tiny_ggufs["F32"].read_bytes()
    cases = {}
    for cut in (len(data) - 100, len(data) // 2, 200, 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        cases[path] = "truncated"
    cases[write_llama_gguf(source, tokenizer, tmp_path / "rwkv.gguf", architecture="rwkv7")] = (
        "cannot read GGUF models of architecture 'rwkv7'"
    )
    (tmp_path / "text.gguf").write_text("not a model")
    cases[tmp_path / "text.gguf"] = "not a GGUF file"
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    cases[tmp_path / "weights.bin"] = "a file but not a GGUF model"
    cases[tmp_path / "absent.gguf"] = "does not exist"
    (tmp_path / "empty-folder").mkdir()
    cases[tmp_path / "empty-folder"] = "folder without config.json"
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "q8_1.gguf"), "llama")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor(
        "token_embd.weight", np.zeros((4, 64 // block * size), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1
    )
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    cases[tmp_path / "q8_1.gguf"] = "stores weights as Q8_1, which gguf"
    for path, message in cases.items():
        with pytest.raises(MonoscopeError, match=message) as err:
            load_model(str(path))
        assert "\n" not in str(err.value), path
    assert _cached(home) == []  # nothing half-made


def test_an_interrupted_conversion_leaves_no_cache(tiny_ggufs, home, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while the checkpoint was being written

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_ggufs["F32"]))
    leftovers = [p.name for p in (home / "models").iterdir() if p.is_dir()]
    assert leftovers == [], leftovers  # neither a final folder nor a hidden temporary one
    monkeypatch.undo()
    monkeypatch.setenv("MONOSCOPE_HOME", str(home))
    assert load_model(str(tiny_ggufs["F32"])).d_model == 32  # the next run converts it whole


def test_cli_harvest_takes_a_gguf_file(tiny_ggufs, home, text_corpus, tmp_path):
    from monoscope.cli import main
    from monoscope.data import ActivationCache

    out = tmp_path / "acts"
    assert (
        main(
            [
                "harvest",
                "--model",
                str(tiny_ggufs["F32"]),
                "--hook",
                "resid_post.1",
                "--corpus",
                str(text_corpus),
                "--tokens",
                "300",
                "--context-size",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cache = ActivationCache(out)
    assert cache.model_name == str(tiny_ggufs["F32"]) and cache.n_tokens >= 300 and cache.d_model == 32


@pytest.mark.embedded
def test_the_embedded_gguf_by_path_is_the_embedded_model():
    gguf_file = gguf_files.embedded_gguf_path()
    shared = gguf_files.ensure_embedded_checkpoint()  # converted by the same convert_gguf as any user file
    assert gguf_files.ensure_gguf_checkpoint(gguf_file) == shared  # found by content hash: no second copy
    by_path, by_name = load_model(str(gguf_file)), load_model(gguf_files.EMBEDDED_MODEL)
    a, b = by_path.model.state_dict(), by_name.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        by_path.tokenizer("The Golden Gate Bridge").input_ids == by_name.tokenizer("The Golden Gate Bridge").input_ids
    )
