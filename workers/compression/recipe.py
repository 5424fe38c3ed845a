"""Recipe specs: one small, versioned config class per method, discriminated on `method`.

This module imports only pydantic, so the API can validate recipes without loading torch. The
function that applies each config lives in `workers.compression.methods` and is registered against
the class.
Adding a method = one config class here (listed in STAGE_CONFIGS) + one registered function + tests.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Fields every quantizing or pruning stage takes."""

    model_config = ConfigDict(extra="forbid")

    # Where the result can run: "cpu" when its kernels exist only there (then the whole job, baseline
    # included, is measured on the CPU so the two numbers compare), None for any device.
    runs_on: ClassVar[str | None] = None

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


STAGE_CONFIGS: tuple[type[StageConfig], ...] = (DynamicInt8Config,)
METHOD_NAMES = frozenset(config.model_fields["method"].default for config in STAGE_CONFIGS)

if len(STAGE_CONFIGS) == 1:
    Stage = STAGE_CONFIGS[0]
else:  # pragma: no cover - becomes the only branch once a second method lands
    Stage = Annotated[Union[STAGE_CONFIGS], Field(discriminator="method")]  # noqa: UP007


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(min_length=1, max_length=16)  # type: ignore[valid-type]

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


def default_metrics(task: str) -> list[str]:
    if task == "causal-lm":
        return ["perplexity", "latency", "size"]
    return ["embedding_cosine", "latency", "size"]


def stage_summary(stage: StageConfig) -> dict[str, Any]:
    return stage.model_dump(mode="json")
