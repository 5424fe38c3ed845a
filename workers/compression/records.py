"""Dataset records: the one reader of the upload formats, for the API (counting and refusing a bad
upload as it is stored) and the worker (reading the records a job uses), so both see the same
records. Standard library only: cheap for the API to import, no torch.

`txt` is one record per non-empty line; `jsonl` one JSON object with a string `text` per non-empty
line (other keys, such as `label` or `text_pair`, are kept). Lines end at b"\\n" only: a JSON string
may hold U+2028 or a form feed, which `str.splitlines` would cut the line at.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

FORMATS = ("txt", "jsonl")
READ_CHUNK = 1 << 20


class RecordError(ValueError):
    """A dataset that does not parse; `line` is the 1-based line at fault (None: the whole file)."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = reason
        self.line = line


class RecordParser:
    """Fed the bytes of a dataset chunk by chunk; `feed` and `finish` return the records completed
    so far, so a large upload is checked without being held in memory."""

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise RecordError(f"unknown dataset format {fmt!r}; expected 'txt' or 'jsonl'")
        self.format = fmt
        self._line_number = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> list[dict]:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        return [record for record in map(self._parse, lines) if record is not None]

    def finish(self) -> list[dict]:
        pending, self._pending = self._pending, b""
        record = self._parse(pending) if pending else None
        return [record] if record is not None else []

    def _parse(self, raw: bytes) -> dict | None:
        self._line_number += 1
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RecordError("not UTF-8", self._line_number) from None
        if not line:
            return None
        if self.format == "txt":
            return {"text": line}
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordError(f"not valid JSON ({error.msg})", self._line_number) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RecordError('expected an object with a string "text"', self._line_number)
        return record


def parse_records(chunks: Iterable[bytes], fmt: str) -> Iterator[dict]:
    parser = RecordParser(fmt)
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.finish()


def count_records(chunks: Iterable[bytes], fmt: str) -> int:
    return sum(1 for _ in parse_records(chunks, fmt))


def read_records(path: Path, fmt: str) -> list[dict]:
    """Every record of a dataset file."""
    with Path(path).open("rb") as handle:
        return list(parse_records(iter(lambda: handle.read(READ_CHUNK), b""), fmt))
