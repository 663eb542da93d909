"""Tokenize documents and pack them into fixed-length contexts that each start with BOS.

Packing wastes no compute on padding; documents are joined with the end-of-text token so the model sees
boundaries. Position 0 (BOS) is an attention sink with outsized norms, so harvesting drops it.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from ..errors import MonoscopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_TOKENIZE_BATCH = 64


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(BOS id that starts every context, separator id between documents)."""
    # isinstance: transformers declares these ids with the type of any special-token attribute (str, lists)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    eos = eos_id if isinstance(eos_id, int) else None
    bos = bos_id if isinstance(bos_id, int) else eos
    if bos is None:
        raise MonoscopeError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    return bos, eos if eos is not None else bos


def pack_contexts(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, context_size: int
) -> Iterator[torch.Tensor]:
    """Yield LongTensor[context_size] contexts: BOS then `context_size - 1` tokens of the joined documents."""
    if context_size < 2:
        raise MonoscopeError(f"context size must be at least 2, got {context_size}")
    bos, sep = special_ids(tokenizer)
    body = context_size - 1
    buffer: list[int] = []
    docs = iter(documents)
    while True:
        chunk = list(islice(docs, _TOKENIZE_BATCH))
        if not chunk:
            break
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(sep)
        start = 0
        while len(buffer) - start >= body:
            yield torch.tensor([bos, *buffer[start : start + body]], dtype=torch.long)
            start += body
        del buffer[:start]


def batched_contexts(contexts: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Group contexts into [batch_size, context_size] tensors (the last batch may be smaller)."""
    it = iter(contexts)
    while True:
        group = list(islice(it, batch_size))
        if not group:
            return
        yield torch.stack(group)
