"""Concept labels (the words a feature's example windows share) and their out-of-sample scores."""

from __future__ import annotations

import torch

from monoscope.features.labels import shared_words, word_table

TEXTS = ["<pad>", " ocean", " Ocean", " the", " ship", "ing", " xqzt", " waves", " sea", " a"]
VOCAB = {"ocean", "ship", "waves", "sea", "the", "a"}


def test_word_table_keeps_whole_english_words_and_merges_case():
    table, words = word_table(TEXTS, VOCAB)
    assert table[1] == table[2] >= 0 and words[int(table[1])] == "ocean"
    for tid in (0, 3, 5, 6, 9):  # padding, a function word, a fragment, a non-word, a one-letter word
        assert table[tid] == -1
    assert {words[int(t)] for t in table if t >= 0} == {"ocean", "ship", "waves", "sea"}


def test_shared_words_counts_windows_not_repeats_and_ignores_held_out_windows():
    table, words = word_table(TEXTS, VOCAB)
    idf = torch.ones(len(words))
    w = {name: TEXTS.index(" " + name) for name in ("ocean", "ship", "waves", "sea")}
    windows = torch.full((1, 4, 5), -1, dtype=torch.long)
    windows[0, 0, :3] = torch.tensor([w["ocean"], w["waves"], 3])
    windows[0, 1, :3] = torch.tensor([2, w["ship"], w["ship"]])  # " Ocean" and a repeated word
    windows[0, 2, :2] = torch.tensor([w["ocean"], w["waves"]])
    windows[0, 3, :4] = torch.tensor([w["sea"], w["sea"], w["sea"], w["sea"]])  # held out: weight 0
    weights = torch.tensor([[1.0, 1.0, 0.5, 0.0]])
    found = [words[i] for i in shared_words(windows, weights, table, idf, n=3)[0]]
    assert found[0] == "ocean" and "waves" in found
    assert "ship" not in found  # in one window only, however often
    assert "sea" not in found  # only in the held-out window
    rarer = idf.clone()
    rarer[table[w["waves"]]] = 10.0  # a rare word outranks a common one in as many windows
    assert words[shared_words(windows, weights, table, rarer, n=3)[0][0]] == "waves"
