"""Before loading anything big: will the job fit in memory? Refuse with the estimate instead of
being killed by the OOM killer half-way through.

The estimate is deliberately simple and a little pessimistic: the float32 weights once (methods
change the model in place), one block's calibration inputs and outputs (layer-by-layer, DESIGN.md
principle 6), the largest per-layer statistic (a GPTQ Hessian is in_features² float32), the
evaluation's largest activation (perplexity logits: seq_len × vocabulary), and the runtime itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from workers.compression import process_memory

# Python, torch, transformers, tokenizers, Celery and the engine imported: 330 MB RSS measured in
# a fresh process (torch 2.13 CPU, transformers 5.24); twice that for allocator caches and threads.
RUNTIME_BYTES = 660_000_000
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
    streamed: bool = False,
    hessians: bool = True,
    stored_bytes_per_parameter: float = FLOAT32,
) -> Estimate:
    """`training_tokens`: tokens of one (micro-)batch of a distillation stage (0: no training).
    `streamed`: the model's blocks stay on disk and one at a time is resident (`streaming.py`):
    the weights term is what lies outside the blocks (its embeddings and head in the checkpoint's
    own dtype, `stored_bytes_per_parameter`) plus the largest block in float32. `hessians`: a
    stage collects a Hessian per layer (GPTQ, AWQ, SparseGPT)."""
    widths = Counter(shape[1] for shape in linear_shapes.values())
    hidden = widths.most_common(1)[0][0] if widths else 1024
    vocabulary = max((shape[0] for shape in linear_shapes.values()), default=hidden)
    largest_input = max((shape[1] for shape in linear_shapes.values()), default=hidden)
    weights = {"weights": parameters * FLOAT32}
    if streamed:
        outside, block = resident_parameters(parameters, linear_shapes)
        weights = {
            "weights_outside_blocks": int(outside * min(FLOAT32, stored_bytes_per_parameter)),
            "one_block": block * FLOAT32,
        }
    breakdown = {
        **weights,
        "calibration_block_activations": 2
        * calibration_samples
        * calibration_seq_len
        * hidden
        * FLOAT32,
        # The Hessian of the widest layer input and, while it is factored, one more matrix of
        # its size (`methods.gptq.inverse_hessian_factor`), for the methods that collect them.
        "layer_statistics": largest_input * largest_input * FLOAT32 * 2
        if calibration_samples and hessians
        else 0,
        "evaluation_activations": evaluation_seq_len * (vocabulary + 8 * hidden) * FLOAT32 * 2,
        # What the runtime takes beyond what this process holds already (that is counted as
        # used, not free, in what `available_memory` reads).
        "runtime": max(0, RUNTIME_BYTES - _own_resident_bytes()) if device == "cpu" else 0,
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


def resident_parameters(parameters: int, linear_shapes: dict[str, list[int]]) -> tuple[int, int]:
    """(parameters outside the repeated blocks, parameters of the largest block) of a model of
    `parameters` in all, from its Linear shapes (norms and biases are a rounding error here)."""
    from workers.compression.architectures import block_prefix_from_names

    prefix = block_prefix_from_names(list(linear_shapes))
    if prefix is None:
        return parameters, 0
    per_block: Counter = Counter()
    for name, (out_features, in_features) in linear_shapes.items():
        if name.startswith(prefix):
            per_block[name[len(prefix) :].split(".", 1)[0]] += out_features * in_features
    largest = max(per_block.values(), default=0)
    return max(0, parameters - sum(per_block.values())), largest


def available_memory(device: str) -> int | None:
    """Free memory on the device: CUDA's free bytes, or the smaller of MemAvailable and this
    process's cgroup limit on the CPU. None when it cannot be read (then nothing is refused)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = process_memory.proc_bytes("/proc/meminfo", "MemAvailable")
    candidates = [] if available is None else [available]
    cgroup = _memory_cgroup()
    if cgroup is not None:
        folder, limit_file, usage_file = cgroup
        try:
            limit = (folder / limit_file).read_text().strip()
        except OSError:
            limit = ""
        if limit.isdigit() and int(limit) < 1 << 60:
            used = _cgroup_usage(folder, usage_file)
            candidates.append(int(limit) - used if used is not None else int(limit))
    override = os.environ.get("SLIMFORMER_MEMORY_LIMIT_BYTES")
    if override:
        candidates.append(int(override))
    return min(candidates) if candidates else None


def host_memory() -> int | None:
    """The host memory this process may use at most: MemTotal, or its cgroup limit when smaller.
    None when neither can be read."""
    candidates = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    cgroup = _memory_cgroup()
    if cgroup is not None:
        folder, limit_file, _usage_file = cgroup
        try:
            limit = (folder / limit_file).read_text().strip()
        except OSError:
            limit = ""
        if limit.isdigit() and int(limit) < 1 << 60:
            candidates.append(int(limit))
    return min(candidates) if candidates else None


def _memory_cgroup() -> tuple[Path, str, str] | None:
    """This process's memory cgroup folder and its limit and usage files (cgroup v2 or v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":  # v1
            return (
                Path("/sys/fs/cgroup/memory") / path.lstrip("/"),
                "memory.limit_in_bytes",
                ("memory.usage_in_bytes"),
            )
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, the unified hierarchy
            return Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current"
    return None


def _cgroup_usage(folder: Path, usage_file: str) -> int | None:
    """What the cgroup uses, less the file cache the kernel would reclaim before refusing memory
    (a streamed model reads and writes its shards through the page cache, which the cgroup is
    charged for)."""
    try:
        used = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return used
    # Clean file pages (v1 `total_cache`, v2 `file`) are dropped before anything is refused;
    # dirty ones must be written first, so they count as used.
    cache = int(stat.get("total_cache", stat.get("file", 0)))
    dirty = sum(
        int(stat.get(key, 0))
        for key in ("total_dirty", "total_writeback", "file_dirty", "file_writeback")
    )
    return max(0, used - max(0, cache - dirty))


def _own_resident_bytes() -> int:
    return process_memory.status_bytes("VmRSS") or 0


# --- disk -------------------------------------------------------------------------------------

# Bytes per Linear weight a stage leaves in a streamed block's scratch file (and, for the last
# stage, in the artifact): float32 for stages whose output is float weights (kept as computed,
# `streaming.py`; the artifact stores them in the checkpoint's dtype), int8 codes plus their
# float32 scales for the quantizing ones (packed in the artifact).
FLOAT_STAGES = {"smoothquant", "magnitude", "wanda", "sparsegpt", "structured"}
INT8_STAGES = {"w8a8", "fp8", "dynamic_int8"}


@dataclass(frozen=True)
class DiskEstimate:
    needed_bytes: int
    free_bytes: int | None
    breakdown: dict[str, int]

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.needed_bytes <= self.free_bytes


def estimate_disk(
    *,
    parameters: int,
    linear_shapes: dict[str, list[int]],
    stages: list,
    folder: Path,
    streamed: bool,
    stored_bytes_per_parameter: float = FLOAT32,
) -> DiskEstimate:
    """The disk a job writes under `folder` (its scratch) at most: a streamed model's changed
    blocks (each block's latest stage output: superseded files are deleted), the export draft,
    and its .tar.gz beside it (quantized and float weights barely compress). `stages`: the
    recipe's stage configs, in order. Pessimistic where it must guess (a distilled student is
    counted at the teacher's size; structured pruning at the unpruned one)."""
    outside, _ = resident_parameters(parameters, linear_shapes)
    in_blocks = max(0, parameters - outside)
    per_stage = [_stored_bytes_per_weight(stage, stored_bytes_per_parameter) for stage in stages]
    final = (
        _stored_bytes_per_weight(stages[-1], stored_bytes_per_parameter, packed=True)
        if stages
        else stored_bytes_per_parameter
    )
    artifact = int(outside * stored_bytes_per_parameter + in_blocks * final)
    breakdown = {
        "changed_blocks": int(in_blocks * max(per_stage, default=0)) if streamed else 0,
        "export": artifact,
        "archive": artifact,
    }
    return DiskEstimate(int(sum(breakdown.values()) * 1.1), free_disk(folder), breakdown)


def _stored_bytes_per_weight(
    stage, stored_bytes_per_parameter: float, *, packed: bool = False
) -> float:
    """`packed`: as the artifact stores it (weight-only codes packed into int32 words), else as
    the block scratch does (one int8 per code)."""
    bits = getattr(stage, "bits", None)
    if bits is not None:  # weight-only: the codes, and a float32 scale per group
        group = getattr(stage, "group_size", -1)
        return (bits / 8 if packed else 1) + (FLOAT32 / group if group and group > 0 else 0)
    if stage.method in INT8_STAGES:
        return 1.0
    if stage.method in FLOAT_STAGES:
        # Kept in float32 while the job runs; the artifact writes them in the checkpoint's dtype
        # (exact, or rounded by the method: `streaming.in_precision`).
        return stored_bytes_per_parameter if packed else FLOAT32
    return stored_bytes_per_parameter  # distill: a student in the checkpoint's dtype


def free_disk(folder: Path) -> int | None:
    """Free bytes on `folder`'s file system for this process, or the smaller of that and
    `SLIMFORMER_DISK_LIMIT_BYTES` (an operator's cap on what a job may write). None when neither
    can be read."""
    candidates = []
    with contextlib.suppress(OSError):  # not there (yet): only the cap, if any
        candidates.append(shutil.disk_usage(folder).free)
    override = os.environ.get("SLIMFORMER_DISK_LIMIT_BYTES")
    if override:
        candidates.append(int(override))
    return min(candidates) if candidates else None
