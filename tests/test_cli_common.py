"""The shared CLI layer: flags read from configs, and reopening what an SAE recorded (model, hook, corpus)."""

from __future__ import annotations

import json

import pytest
from tests.test_sae_lm_eval import split_sign_sae  # reconstructs every input exactly

from monoscope.cli import build_parser, main
from monoscope.data import HarvestConfig, open_corpus
from monoscope.errors import MonoscopeError
from monoscope.sae import load_sae, save_sae
from monoscope.sae.evaluation import EvalConfig
from monoscope.sae.recorded import RecordedCorpus, SAERecord


def test_a_recorded_corpus_reads_the_same_as_keywords_or_a_plain_spec(text_corpus):
    spec = str(text_corpus)
    as_keywords = RecordedCorpus.from_info(
        {"corpus": {"spec": spec, "seed": 3, "text_column": "body", "split": "train"}}
    )
    assert (as_keywords.spec, as_keywords.seed, as_keywords.text_column) == (spec, 3, "body")
    as_text = RecordedCorpus.from_info({"corpus": spec})
    assert (as_text.spec, as_text.seed) == (spec, None)
    assert RecordedCorpus.from_info({}) == RecordedCorpus() == RecordedCorpus.from_info({"corpus": 7})

    reopened = as_keywords.reopen()
    assert (reopened.spec, reopened.seed, reopened.text_column) == (spec, 3, "body")
    assert as_keywords.reopen(seed=5).seed == 5  # a given part overrides the record
    other = as_keywords.reopen("starter")  # another corpus: the record says nothing about it
    assert (other.spec, other.seed, other.text_column) == ("starter", 0, "text")
    assert as_text.reopen().spec == spec and RecordedCorpus().reopen().spec == "starter"

    assert as_keywords.is_source_of(open_corpus(spec, seed=3))
    assert not as_keywords.is_source_of(open_corpus(spec, seed=0))
    assert not as_text.is_source_of(open_corpus(spec))  # seed unknown: the training text cannot be told apart


def test_the_record_falls_back_to_saelens_metadata_and_names_what_is_missing(tmp_path):
    sae = split_sign_sae(32)
    sae.cfg.metadata.update(model_name="org/some-model", hook_name="blocks.1.hook_resid_post", context_size=64)
    record = SAERecord.of(sae)
    assert (record.model, record.hook, record.context()) == ("org/some-model", "resid_post.1", 64)
    assert record.context(16) == 16 and SAERecord().context() == 128
    assert record.model_name("other/model") == "other/model"
    with pytest.raises(MonoscopeError, match="pass --model"):
        SAERecord().model_name()
    assert SAERecord().model_name(fallback="smollm2-135m-instruct") == "smollm2-135m-instruct"
    with pytest.raises(MonoscopeError, match="which is not here; pass --model"):
        SAERecord(model=str(tmp_path / "gone")).model_name(fallback="smollm2-135m-instruct")
    with pytest.raises(MonoscopeError, match="pass --hook"):
        SAERecord().hook_point()


def test_eval_reopens_an_sae_whose_corpus_is_recorded_as_a_plain_spec(tiny_llama_dir, text_corpus, tmp_path, capsys):
    folder = tmp_path / "sae"
    info = {
        "model": str(tiny_llama_dir),
        "hook_point": "resid_post.0",
        "context_size": 16,
        "corpus": str(text_corpus),
        "harvest_contexts": 4,
    }
    save_sae(split_sign_sae(32), folder, info)
    assert load_sae(folder).info["corpus"] == str(text_corpus)
    assert main(["eval", "--sae", str(folder), "--tokens", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hook_point"] == "resid_post.0" and result["model"] == str(tiny_llama_dir)
    assert result["held_out_from_context"] == 0  # no seed recorded: the training text is not known to come first
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert json.loads((folder / "eval.json").read_text())["tokens"] == result["tokens"]


def test_flags_of_commands_with_a_config_take_its_defaults_and_help():
    parser = build_parser()
    harvest = parser.parse_args(["harvest", "--out", "x"])
    defaults = HarvestConfig()
    for name in (
        "model",
        "corpus",
        "text_column",
        "split",
        "tokens",
        "context_size",
        "batch_size",
        "seed",
        "device",
        "model_dtype",
        "cache_dtype",
        "shard_tokens",
    ):
        assert getattr(harvest, name) == getattr(defaults, name), name
    evaluation = parser.parse_args(["eval", "--sae", "x"])
    for name in ("tokens", "context_size", "sample_seed", "untouched_positions"):
        assert getattr(evaluation, name) == getattr(EvalConfig(), name), name
    subparsers = next(a for a in parser._actions if a.choices and "harvest" in a.choices).choices
    help_text = " ".join(subparsers["harvest"].format_help().split())
    assert "rows per shard file (default: 32768)" in help_text and "storage dtype (default: float16)" in help_text
