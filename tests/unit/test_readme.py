"""The README works in a fresh clone (issue 13, "CLI and docs"): every file of the repository it
names exists, nothing points outside the clone, and the CLI is shown where it is installed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILE = re.compile(r"`([^`\s]+\.(?:md|py|sh|toml|txt|yml|yaml|json|js|css|html))`")


def test_every_file_the_readme_names_is_in_the_clone() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = {
        path
        for path in FILE.findall(text)
        if "/" in path and not path.startswith("/") and "…" not in path  # URL paths, examples
    }
    assert named, "the README names no files: the pattern is wrong"
    outside = sorted(path for path in named if path.startswith(".."))
    assert not outside, f"outside the clone: {outside}"
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"named by the README, not in the repository: {missing}"
    assert "](http" not in text.replace("](http://localhost", "")  # no outside links to rot


def test_the_cli_is_shown_where_it_is_installed() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".venv/bin/slimformer" in text
    assert "SLIMFORMER_URL" in text and "--url" in text
