"""Where the engine runs: the GPU when there is one, unless SLIMFORMER_DEVICE says otherwise."""

from __future__ import annotations

import os
import platform

import torch

from workers.compression.preflight import host_memory


def select_device() -> torch.device:
    override = os.environ.get("SLIMFORMER_DEVICE", "").strip()
    if override:
        return torch.device(override)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe() -> dict:
    """This process's device class (cpu | gpu), its name and memory, for the worker registry.
    Asking CUDA initialises it: call this in a process that will not fork afterwards
    (`workers.presence.probe` runs it in a child of its own)."""
    device = select_device()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return {
            "device": "gpu",
            "device_name": properties.name,
            "memory_bytes": int(properties.total_memory),
            "visible_gpus": torch.cuda.device_count(),
        }
    return {
        "device": "cpu",
        "device_name": _cpu_name(),
        "memory_bytes": host_memory(),
        "visible_gpus": 0,
    }


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None
