"""Reading uploaded datasets and cutting calibration windows."""

from __future__ import annotations

import json

import pytest
import torch

from workers.compression.data import calibration_batches, read_records, special_tokens_around


def test_read_txt_keeps_non_empty_lines(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("first line\n\n  second line  \n\t\nthird\n", encoding="utf-8")
    assert read_records(path, "txt") == [
        {"text": "first line"},
        {"text": "second line"},
        {"text": "third"},
    ]


def test_read_jsonl_keeps_labels_and_reports_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    assert read_records(path, "jsonl") == rows

    path.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_records(path, "jsonl")
    path.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_records(path, "jsonl")
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_records(path, "csv")


def test_calibration_batches_are_seeded_windows(llama, records):
    texts = [record["text"] for record in records]
    tokenizer = llama.tokenizer
    first = calibration_batches(texts, tokenizer, num_samples=6, seq_len=16, seed=0)
    again = calibration_batches(texts, tokenizer, num_samples=6, seq_len=16, seed=0)
    other = calibration_batches(texts, tokenizer, num_samples=6, seq_len=16, seed=1)
    assert len(first) == 6 and all(batch.shape == (1, 16) for batch in first)
    assert all(batch.dtype == torch.long for batch in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Every window is a contiguous slice of the token stream.
    stream = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, stream))
    assert all(" ".join(map(str, batch[0].tolist())) in joined for batch in first)


def test_calibration_windows_keep_the_tokenizer_special_tokens(bert, records):
    assert special_tokens_around(bert.tokenizer) == ([2], [3])  # [CLS] ... [SEP]
    texts = [record["text"] for record in records]
    batches = calibration_batches(texts, bert.tokenizer, num_samples=3, seq_len=12, seed=0)
    assert all(batch[0, 0] == 2 and batch[0, -1] == 3 for batch in batches)


def test_calibration_data_shorter_than_a_window_is_an_error(llama):
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_batches(["the river"], llama.tokenizer, num_samples=1, seq_len=16, seed=0)
