"""The one dataset parser the API's upload check and the worker's reader share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.compression.records import RecordError, count_records, parse_records, read_records


def test_chunk_boundaries_do_not_change_the_records(tmp_path: Path) -> None:
    rows = [{"text": "naïve café", "label": 1}, {"text": "line\u2028separator", "text_pair": "x"}]
    body = ("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\r\n\n").encode()
    # One byte at a time splits the two-byte UTF-8 characters across chunks.
    assert list(parse_records([body[i : i + 1] for i in range(len(body))], "jsonl")) == rows
    path = tmp_path / "d.jsonl"
    path.write_bytes(body)
    assert read_records(path, "jsonl") == rows  # U+2028 inside a string does not end the line
    assert count_records([body], "jsonl") == 2


def test_txt_keeps_non_empty_lines_and_a_last_line_without_newline() -> None:
    assert list(parse_records([b"  one \n\n\t\ntw", b"o"], "txt")) == [
        {"text": "one"},
        {"text": "two"},
    ]
    assert count_records([b"\n \n"], "txt") == 0


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        (b'{"text": "ok"}\nnot json\n', 2, "not valid JSON"),
        (b'{"text": "ok"}\n\n{"label": 1}\n', 3, 'expected an object with a string "text"'),
        (b'["text"]', 1, "expected an object"),
        (b"fine\n\xff\xfe\n", 2, "not UTF-8"),
    ],
)
def test_a_bad_line_is_named(body: bytes, line: int, reason: str) -> None:
    fmt = "txt" if reason == "not UTF-8" else "jsonl"
    with pytest.raises(RecordError) as raised:
        count_records([body], fmt)
    assert raised.value.line == line and raised.value.reason.startswith(reason)
    assert str(raised.value).startswith(f"line {line}: ")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(RecordError, match="unknown dataset format 'csv'"):
        count_records([b"a,b\n"], "csv")
