"""Accuracy-aware search over recipes: `search(...)` finds the smallest model that holds a job's
targets (see `search.py`); `compress` stays the verb for one recipe."""

from workers.compression.search.search import SearchResult, footprint, search
from workers.compression.search.split import SearchSplitError, search_split
from workers.compression.search.targets import Targets

__all__ = ["SearchResult", "SearchSplitError", "Targets", "footprint", "search", "search_split"]
