"""Accuracy-aware search over recipes: `search(...)` finds the smallest model that holds a job's
targets (see `loop.py`); `compress` stays the verb for one recipe.

The API imports `targets` (plain Python) to validate requests; the rest needs torch, so it is
imported on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SearchResult": "loop",
    "footprint": "loop",
    "search": "loop",
    "SearchSplitError": "split",
    "search_split": "split",
    "Targets": "targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
