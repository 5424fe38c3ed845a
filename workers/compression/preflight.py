"""Before loading anything big: will the job fit in memory? Refuse with the estimate instead of
being killed by the OOM killer half-way through.

The estimate is deliberately simple and a little pessimistic: the float32 weights once (methods
change the model in place), one block's calibration inputs and outputs (layer-by-layer, DESIGN.md
principle 6), the largest per-layer statistic (a GPTQ Hessian is in_features² float32), the
evaluation's largest activation (perplexity logits: seq_len × vocabulary), and the runtime itself.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RUNTIME_BYTES = 1_200_000_000  # python, torch, transformers, tokenizers: measured ~1.1 GB RSS
FLOAT32 = 4


@dataclass(frozen=True)
class Estimate:
    peak_bytes: int
    available_bytes: int | None
    breakdown: dict[str, int]

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= self.available_bytes


def estimate_memory(
    *,
    parameters: int,
    linear_shapes: dict[str, list[int]],
    calibration_samples: int,
    calibration_seq_len: int,
    evaluation_seq_len: int,
    device: str,
    training_tokens: int = 0,
) -> Estimate:
    """`training_tokens`: tokens of one (micro-)batch of a distillation stage (0: no training)."""
    widths = Counter(shape[1] for shape in linear_shapes.values())
    hidden = widths.most_common(1)[0][0] if widths else 1024
    vocabulary = max((shape[0] for shape in linear_shapes.values()), default=hidden)
    largest_input = max((shape[1] for shape in linear_shapes.values()), default=hidden)
    breakdown = {
        "weights": parameters * FLOAT32,
        "calibration_block_activations": 2
        * calibration_samples
        * calibration_seq_len
        * hidden
        * FLOAT32,
        "layer_statistics": largest_input * largest_input * FLOAT32 * 2,
        "evaluation_activations": evaluation_seq_len * (vocabulary + 8 * hidden) * FLOAT32 * 2,
        "runtime": RUNTIME_BYTES if device == "cpu" else 0,
    }
    if training_tokens:
        # A frozen teacher copy, the student's gradients and two AdamW moments (all float32, the
        # student at most the teacher's size), and per token: both models' logits with their
        # softmaxes and gradient, and the student's saved activations (~24 per block and width).
        blocks = max(1, len(linear_shapes) // 7)
        breakdown["training_state"] = 4 * parameters * FLOAT32
        breakdown["training_activations"] = (
            training_tokens * (6 * vocabulary + 24 * blocks * hidden) * FLOAT32
        )
    return Estimate(int(sum(breakdown.values()) * 1.2), available_memory(device), breakdown)


def available_memory(device: str) -> int | None:
    """Free memory on the device: CUDA's free bytes, or the smaller of MemAvailable and this
    process's cgroup limit on the CPU. None when it cannot be read (then nothing is refused)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    candidates = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            used = _cgroup_usage()
            candidates.append(int(limit) - used if used is not None else int(limit))
    override = os.environ.get("SLIMFORMER_MEMORY_LIMIT_BYTES")
    if override:
        candidates.append(int(override))
    return min(candidates) if candidates else None


def _cgroup_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
    return None
