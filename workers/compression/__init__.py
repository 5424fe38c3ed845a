"""The compression engine: a plain library (torch + transformers), no HTTP, database or Celery.

Importing the package does not import torch, so the API can read `recipe` and `records` cheaply;
`compress` and `Result` load the engine on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Result", "compress"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from workers.compression import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
