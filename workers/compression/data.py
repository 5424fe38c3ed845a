"""Text records in, token windows out: what calibration and evaluation feed the model."""

from __future__ import annotations

import torch

# The engine reads dataset files here; the parser is shared with the API's upload check.
from workers.compression.records import read_records as read_records


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS]…[SEP] for BERT, <s>… for
    Llama, nothing for SmolLM2), so that windows cut from one long token stream look like the
    inputs the model saw in training."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("hello")["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain) :]
    raise ValueError("cannot tell which special tokens this tokenizer adds")


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """All texts as one token sequence, separated by a blank line as in WikiText-style corpora."""
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for index, ids in enumerate(encoded):
        if index:
            stream.extend(separator)
        stream.extend(ids)
    return stream


def calibration_batches(
    texts: list[str], tokenizer, *, num_samples: int, seq_len: int, seed: int
) -> list[torch.Tensor]:
    """`num_samples` windows of `seq_len` tokens, each a [1, seq_len] input_ids tensor, cut at
    seeded random offsets from the concatenated texts (the GPTQ/SparseGPT recipe). The same texts,
    tokenizer and seed always give the same windows."""
    prefix, suffix = special_tokens_around(tokenizer)
    content_len = seq_len - len(prefix) - len(suffix)
    if content_len < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room next to the special tokens")
    stream = token_stream(texts, tokenizer)
    if len(stream) < content_len:
        raise ValueError(
            f"calibration data has {len(stream)} tokens, fewer than one window of {seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - content_len + 1, (num_samples,), generator=generator)
    return [
        torch.tensor([prefix + stream[start : start + content_len] + suffix])
        for start in starts.tolist()
    ]
