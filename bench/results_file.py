"""Where a bench writes: `bench/results/<name>.json` (machine, command, rows) and its Markdown page.

Rows are kept across runs per key (a label, a backend, a case …), so a run before a change and one
after it sit together in the same file.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count()}


def merged_rows(name: str, new: Iterable[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """The rows already in `<name>.json`, with each of `new` replacing the row of its key."""
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["results"] if path.exists() else []
    for row in new:
        rows = [old for old in rows if key(old) != key(row)]
        rows.append(row)
    return rows


def write(name: str, body: dict, page: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(page)


def table(header: list[str], rows: Iterable[Iterable]) -> str:
    """A Markdown table; cells are written as they are given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def by_label(rows: list[dict], render: Callable[[list[dict]], str]) -> str:
    """One `### label` section per label, in the order labels first appear."""
    return "\n".join(
        f"### {label or 'current'}\n\n" + render([row for row in rows if row["label"] == label])
        for label in dict.fromkeys(row["label"] for row in rows)
    )


def write_labelled(
    name: str,
    new: list[dict],
    *,
    label: str,
    key: Callable[[dict], tuple],
    render: Callable[[list[dict]], str],
    intro: str,
    body: Mapping[str, object],
    defaults: Mapping[str, object] | None = None,
) -> str:
    """A bench's run written beside the earlier ones: `new` rows get `label`, replace the stored
    rows of their `key` (which should include the label) in `<name>.json`, and the Markdown page is
    `intro` and then one `### label` section of `render`'s table per label. `body` is the JSON's
    fields between `machine` and `results` (the command); `defaults` fills fields that rows
    written by older code lack. Returns the sections (the caller prints them)."""
    for row in new:
        row["label"] = label
    rows = merged_rows(name, new, key)
    for row in rows:
        for field, value in (defaults or {}).items():
            row.setdefault(field, value)
    tables = by_label(rows, render)
    write(name, {"machine": machine(), **body, "results": rows}, intro + tables)
    return tables
