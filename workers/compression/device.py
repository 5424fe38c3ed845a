"""Where the engine runs: the GPU when there is one, unless SLIMFORMER_DEVICE says otherwise."""

from __future__ import annotations

import os

import torch


def select_device() -> torch.device:
    override = os.environ.get("SLIMFORMER_DEVICE", "").strip()
    if override:
        return torch.device(override)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
