"""Shared fixtures: tiny, randomly initialised real models with a real (tiny, trained-here) tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "There once was a man from Peru who dreamed he was eating his shoe.",
    "Q: What is the capital of France?\nA: Paris.",
    "import os\nprint(os.getcwd())",
    "Beware of bugs in the above code; I have only proved it correct, not tried it.",
] * 4


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SAMPLE_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return _save(tiny_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    return _save(tiny_gpt2(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small folder of plain-text documents, enough for a few hundred contexts of 16 tokens."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(
            "\n\n".join(SAMPLE_TEXT[j % len(SAMPLE_TEXT)] + f" Note {i}-{j}." for j in range(40))
        )
    return folder


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A loud line when the peer round-trip tests skipped: a green run then says nothing about SAELens/sparsify."""
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if "test_interop_peers" in report.nodeid]
    if not skipped:
        return
    reasons = sorted(
        {str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr) for report in skipped}
    )
    terminalreporter.write_sep(
        "!", f"{len(skipped)} PEER ROUND-TRIP TESTS SKIPPED: SAELens/sparsify interop NOT checked", red=True, bold=True
    )
    for reason in reasons:
        terminalreporter.write_line(f"  {reason}", red=True)
