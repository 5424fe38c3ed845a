"""Text records in, token windows out: what calibration and evaluation feed the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_records(path: Path, fmt: str) -> list[dict]:
    """Records from an uploaded dataset: `txt` is one record per non-empty line, `jsonl` one JSON
    object with a string `text` per non-empty line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if fmt == "txt":
        return [{"text": line.strip()} for line in lines if line.strip()]
    if fmt != "jsonl":
        raise ValueError(f"unknown dataset format {fmt!r}; expected 'txt' or 'jsonl'")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'line {number}: expected an object with a string "text"')
        records.append(record)
    return records


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
