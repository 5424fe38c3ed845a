"""Recipe specs: one small, versioned config class per method, discriminated on `method`.

This module imports only pydantic, so the API can validate recipes without loading torch. The
function that applies each config lives in `workers.compression.methods` and is registered against
the class.
Adding a method = one config class here (listed in STAGE_CONFIGS) + one registered function + tests.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StageConfig(BaseModel):
    """Fields every quantizing or pruning stage takes."""

    model_config = ConfigDict(extra="forbid")

    # Where the result can run: "cpu" when its kernels exist only there (then the whole job, baseline
    # included, is measured on the CPU so the two numbers compare), None for any device.
    runs_on: ClassVar[str | None] = None
    # Whether the stage needs the job's calibration batches.
    needs_calibration: ClassVar[bool] = False

    method: str
    version: Literal[1] = 1
    ignore: list[str] = Field(
        default_factory=list, description="Module-name patterns left alone (fnmatch), e.g. lm_head"
    )
    modules: list[str] | None = Field(
        default=None,
        description="Module types (`Linear`) or name patterns to touch; default: every Linear "
        "inside the model's blocks",
    )


class DynamicInt8Config(StageConfig):
    """INT8 weights (per output channel by default), activations quantized at run time (CPU)."""

    runs_on: ClassVar[str | None] = "cpu"  # torch's dynamic int8 kernels are CPU kernels

    method: Literal["dynamic_int8"] = "dynamic_int8"
    per_channel: bool = True


class WeightOnlyConfig(StageConfig):
    """Weight-only integer quantization: `bits`, groups of `group_size` input channels sharing a
    scale (-1: one group per output channel), symmetric or with a zero point."""

    needs_calibration: ClassVar[bool] = False

    bits: int = Field(default=4, ge=2, le=8)
    group_size: int = Field(default=128, ge=-1, le=8192)
    symmetric: bool = True

    @field_validator("group_size")
    @classmethod
    def _positive_or_per_channel(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("group_size must be positive, or -1 for one group per output channel")
        return value


class RtnConfig(WeightOnlyConfig):
    """Round-to-nearest: each group's weights scaled and rounded, no calibration data."""

    method: Literal["rtn"] = "rtn"


class GptqConfig(WeightOnlyConfig):
    """GPTQ (Frantar et al. 2022): quantize one input column at a time and spread the error over
    the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs."""

    needs_calibration: ClassVar[bool] = True

    method: Literal["gptq"] = "gptq"
    act_order: bool = False
    damping: float = Field(default=0.01, gt=0, le=1)
    block_size: int = Field(default=128, ge=1, le=4096)


STAGE_CONFIGS: tuple[type[StageConfig], ...] = (DynamicInt8Config, RtnConfig, GptqConfig)
METHOD_NAMES = frozenset(config.model_fields["method"].default for config in STAGE_CONFIGS)

if len(STAGE_CONFIGS) == 1:
    Stage = STAGE_CONFIGS[0]
else:  # pragma: no cover - becomes the only branch once a second method lands
    Stage = Annotated[Union[STAGE_CONFIGS], Field(discriminator="method")]  # noqa: UP007


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(min_length=1, max_length=16)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_export_format(self) -> Recipe:
        methods = {stage.method for stage in self.stages}
        if "dynamic_int8" in methods and methods & {"rtn", "gptq"}:
            raise ValueError(
                "dynamic_int8 cannot be combined with weight-only rtn/gptq in one recipe: no "
                "export format holds both kinds of layer"
            )
        return self

    @property
    def needs_calibration(self) -> bool:
        return any(stage.needs_calibration for stage in self.stages)

    @property
    def required_device(self) -> str | None:
        """The device every stage's output can run on (None: any)."""
        return next((stage.runs_on for stage in self.stages if stage.runs_on), None)


class LatencySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=1, ge=1, le=256)
    seq_len: int = Field(default=128, ge=1, le=8192)
    runs: int = Field(default=20, ge=1, le=1000)
    warmup: int = Field(default=3, ge=0, le=100)


Metric = Literal["perplexity", "embedding_cosine", "accuracy", "latency", "size"]


class EvaluationSettings(BaseModel):
    """How baseline and result are measured; recorded next to every number it produces."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[Metric] | None = None  # None: what fits the model's task
    seq_len: int = Field(default=512, ge=8, le=8192)
    stride: int | None = Field(default=None, ge=1, le=8192)  # None: seq_len (no overlap)
    max_windows: int = Field(default=40, ge=1, le=10_000)
    max_samples: int = Field(default=256, ge=1, le=100_000)  # embedding_cosine / accuracy texts
    latency: LatencySettings = Field(default_factory=LatencySettings)


def name_matches(name: str, pattern: str) -> bool:
    """A pattern matches a full module name with fnmatch, or its dotted tail (`q_proj`)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


_BLOCK_INDEX = re.compile(r"^((?:[^.]+\.)*?)(\d+)\.")


def selected_linear_names(stage: StageConfig, linear_names: list[str]) -> list[str]:
    """The torch-free mirror of `targets.linear_layers` for a list of Linear module names, so the
    API can check a recipe against a model's shapes without loading it. The blocks are the
    prefix followed by the most distinct indices (`model.layers.`, `encoder.layer.`)."""
    if stage.modules is None:
        indices: dict[str, set[str]] = {}
        for name in linear_names:
            match = _BLOCK_INDEX.match(name)
            if match:
                indices.setdefault(match.group(1), set()).add(match.group(2))
        if not indices:
            return []
        prefix = max(indices, key=lambda key: len(indices[key]))
        wanted = [name for name in linear_names if name.startswith(prefix)]
    else:
        wanted = [
            name
            for name in linear_names
            if any(pattern == "Linear" or name_matches(name, pattern) for pattern in stage.modules)
        ]
    return [name for name in wanted if not any(name_matches(name, p) for p in stage.ignore)]


def group_size_conflicts(stage: StageConfig, linear_shapes: dict[str, list[int]]) -> list[str]:
    """Targeted layers whose input width the stage's group size does not divide."""
    group_size = getattr(stage, "group_size", None)
    if group_size is None or group_size == -1:
        return []
    return [
        name
        for name in selected_linear_names(stage, list(linear_shapes))
        if linear_shapes[name][1] % group_size
    ]


def default_metrics(task: str) -> list[str]:
    if task == "causal-lm":
        return ["perplexity", "latency", "size"]
    return ["embedding_cosine", "latency", "size"]


def stage_summary(stage: StageConfig) -> dict[str, Any]:
    return stage.model_dump(mode="json")
