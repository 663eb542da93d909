"""Corpus sources and packing: files, folders, JSONL, Parquet, HF datasets (local), the starter corpus."""

from __future__ import annotations

import json

import pytest
import torch

from monoscope.data import open_corpus, pack_contexts, starter_documents
from monoscope.data.packing import special_ids
from monoscope.errors import MonoscopeError


def test_starter_corpus_mixes_kinds_and_is_seeded():
    docs = starter_documents(seed=0)
    kinds = {d.kind for d in docs}
    assert {"fortune", "poem", "docs", "code"} <= kinds
    first_500 = {d.kind for d in docs[:500]}
    assert {"fortune", "poem", "code"} <= first_500, "a short harvest should already see several kinds of text"
    assert [d.text for d in starter_documents(seed=0)[:50]] == [d.text for d in docs[:50]]
    assert [d.text for d in starter_documents(seed=1)[:50]] != [d.text for d in docs[:50]]
    assert not any(d.source.endswith("-o") for d in docs), "offensive fortune files are left out"


def test_text_jsonl_parquet_files_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    pq.write_table(pa.table({"body": ["p0", "p1"]}), tmp_path / "c.parquet")
    assert list(open_corpus(str(tmp_path / "a.txt")).documents()) == ["first paragraph\n\nsecond paragraph"]
    assert list(open_corpus(str(tmp_path / "b.jsonl"), text_column="body").documents()) == ["row 0", "row 1", "row 2"]
    assert list(open_corpus(str(tmp_path / "c.parquet"), text_column="body").documents()) == ["p0", "p1"]
    (tmp_path / "a.txt").unlink()
    docs = list(open_corpus(str(tmp_path), text_column="body").documents())
    assert sorted(docs) == ["p0", "p1", "row 0", "row 1", "row 2"]


def test_missing_text_column_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(MonoscopeError, match="no text column 'text'.*content, id"):
        list(open_corpus(str(tmp_path / "b.jsonl")).documents())
    pq.write_table(pa.table({"content": ["p0"]}), tmp_path / "c.parquet")
    with pytest.raises(MonoscopeError, match="available columns: content"):
        list(open_corpus(str(tmp_path / "c.parquet")).documents())


def test_bad_and_empty_corpora(tmp_path):
    with pytest.raises(MonoscopeError, match="neither 'starter'"):
        open_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("   \n\n  ")
    with pytest.raises(MonoscopeError, match="contains no text"):
        list(open_corpus(str(tmp_path / "empty.txt")).documents())
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(MonoscopeError, match="must end in one of"):
        open_corpus(str(tmp_path / "data.csv"))


def test_hf_datasets_streaming_from_a_local_dataset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"story number {i}", "n": i}) for i in range(20)))
    docs = list(open_corpus(f"hf:{folder}", seed=3).documents())
    assert sorted(docs) == sorted(f"story number {i}" for i in range(20))
    with pytest.raises(MonoscopeError, match="no text column 'story'"):
        list(open_corpus(f"hf:{folder}", text_column="story").documents())


def test_packing_starts_every_context_with_bos_and_keeps_every_token(tokenizer):
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"] * 10
    contexts = list(pack_contexts(docs, tokenizer, context_size=8))
    bos, sep = special_ids(tokenizer)
    assert contexts and all(c.shape == (8,) and c[0].item() == bos for c in contexts)
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [sep]
    body = torch.cat([c[1:] for c in contexts]).tolist()
    assert body == stream[: len(body)] and len(stream) - len(body) < 7
    assert [c.tolist() for c in pack_contexts(docs, tokenizer, context_size=8)] == [c.tolist() for c in contexts]
