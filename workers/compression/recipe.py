"""Recipe specs: one small, versioned config class per method, discriminated on `method`.

This module imports only pydantic (and the torch-free `architectures`), so the API can validate
recipes without loading torch. The function that applies each config lives in
`workers.compression.methods` and is registered against the class.
Adding a method = one config class here (listed in STAGE_CONFIGS) + one registered function + tests.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.compression.architectures import (
    FFN_NARROWING,
    FFN_WIDENING,
    block_prefix_from_names,
    name_in_block,
    select_layers,
)


class StageConfig(BaseModel):
    """Fields every quantizing or pruning stage takes, and the facts about a stage that recipe
    validation, the API and the engine read instead of tables of method names. Read them on a
    stage (an instance): where a field decides one (w8a8's `activations`, structured's `criterion`)
    the subclass answers with a property."""

    model_config = ConfigDict(extra="forbid")

    # Where the result can run: "cpu" when its kernels exist only there (then the whole job, baseline
    # included, is measured on the CPU so the two numbers compare), None for any device.
    runs_on: ClassVar[str | None] = None
    # The quantized storage its layers end in (one compressed-tensors format per family); one
    # artifact holds one format, so one recipe uses one family. None: the weights stay float.
    family: ClassVar[str | None] = None
    # Whether the stage needs the job's calibration batches.
    needs_calibration: ClassVar[bool] = False
    # Changes or removes float weights: it must come before any quantizing stage (it would undo
    # the quantized weights).
    rescales_weights: ClassVar[bool] = False
    # Makes the model smaller, so a later `distill` without a student has something to recover.
    shrinks: ClassVar[bool] = False
    # Collects a Hessian (XᵀX of each layer's inputs, in² floats) per layer: preflight counts it.
    collects_hessians: ClassVar[bool] = False
    # Runs on a streamed model (`streaming.py`: one block resident, the rest on disk), so a model
    # larger than the worker's memory can take it.
    streams: ClassVar[bool] = True

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

    def needs_original(self) -> bool:
        """Whether the stage reads the model as the recipe received it (the engine keeps a copy)."""
        return False

    def referenced_ids(self) -> dict[str, list[str]]:
        """Other registered models and datasets the stage reads, for the API to check they exist."""
        return {"model_ids": [], "dataset_ids": []}


class DynamicInt8Config(StageConfig):
    """INT8 weights (per output channel by default), activations quantized at run time (CPU)."""

    runs_on: ClassVar[str | None] = "cpu"  # torch's dynamic int8 kernels are CPU kernels
    streams: ClassVar[bool] = False  # torch's packed int8 Linear has no tensors to offload
    family: ClassVar[str | None] = "int8 weights and activations"

    method: Literal["dynamic_int8"] = "dynamic_int8"
    per_channel: bool = True


class WeightOnlyConfig(StageConfig):
    """Weight-only integer quantization: `bits`, groups of `group_size` input channels sharing a
    scale (-1: one group per output channel), symmetric or with a zero point."""

    family: ClassVar[str | None] = "weight-only integer"

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
    collects_hessians: ClassVar[bool] = True

    method: Literal["gptq"] = "gptq"
    act_order: bool = True  # largest inputs first: column order can lose to RTN (SmolLM2)
    damping: float = Field(default=0.01, gt=0, le=1)
    block_size: int = Field(default=128, ge=1, le=4096)


class AwqConfig(WeightOnlyConfig):
    """AWQ (Lin et al. 2023): scale the input channels that carry large activations up before
    rounding (and their producer down), choosing the exponent of the scales on calibration data
    from a grid of `grid` points in [0, 1)."""

    needs_calibration: ClassVar[bool] = True
    collects_hessians: ClassVar[bool] = True
    rescales_weights: ClassVar[bool] = True

    method: Literal["awq"] = "awq"
    grid: int = Field(default=20, ge=1, le=100)


class SmoothQuantConfig(StageConfig):
    """SmoothQuant (Xiao et al. 2022): move activation outliers into the weights with an exact
    per-channel rescaling, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); quantizes nothing itself."""

    needs_calibration: ClassVar[bool] = True
    rescales_weights: ClassVar[bool] = True

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.5, ge=0, le=1)


class W8A8Config(StageConfig):
    """INT8 weights per output channel and INT8 activations: one calibrated scale per layer input
    (`static`) or one per token computed at run time (`dynamic`, the default: one scale per
    tensor cannot hold the few outlier tokens of a causal LM's down_proj inputs)."""

    family: ClassVar[str | None] = "int8 weights and activations"

    method: Literal["w8a8"] = "w8a8"
    activations: Literal["static", "dynamic"] = "dynamic"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.activations == "static"


class Fp8Config(StageConfig):
    """FP8 (E4M3) weights with one scale per output channel; activations stay in the model's float
    type (`none`) or are cast to FP8 per token at run time (`dynamic`)."""

    family: ClassVar[str | None] = "fp8"

    method: Literal["fp8"] = "fp8"
    activations: Literal["none", "dynamic"] = "none"


class SparsityConfig(StageConfig):
    """Fields of the unstructured / semi-structured pruning stages."""

    rescales_weights: ClassVar[bool] = True
    shrinks: ClassVar[bool] = True

    sparsity: float = Field(default=0.5, gt=0, lt=1)
    pattern: Literal["unstructured", "2:4"] = "unstructured"

    @model_validator(mode="after")
    def _two_of_four_is_half(self) -> SparsityConfig:
        if self.pattern == "2:4" and "sparsity" in self.model_fields_set and self.sparsity != 0.5:
            raise ValueError("pattern 2:4 removes exactly half the weights: sparsity must be 0.5")
        return self


class MagnitudeConfig(SparsityConfig):
    """Remove the weights of smallest magnitude in each row (no calibration data)."""

    method: Literal["magnitude"] = "magnitude"


class WandaConfig(SparsityConfig):
    """Wanda (Sun et al. 2023): remove the weights of smallest |W_ij| * ||X_j|| in each row."""

    needs_calibration: ClassVar[bool] = True

    method: Literal["wanda"] = "wanda"


class SparseGptConfig(SparsityConfig):
    """SparseGPT (Frantar & Alistarh 2023): prune by the inverse Hessian of the layer inputs and
    update the remaining weights to compensate."""

    needs_calibration: ClassVar[bool] = True
    collects_hessians: ClassVar[bool] = True

    method: Literal["sparsegpt"] = "sparsegpt"
    damping: float = Field(default=0.01, gt=0, le=1)
    block_size: int = Field(default=128, ge=1, le=4096)


class StructuredConfig(StageConfig):
    """Remove whole attention heads and FFN channels; the weights and config really shrink."""

    rescales_weights: ClassVar[bool] = True
    shrinks: ClassVar[bool] = True

    method: Literal["structured"] = "structured"
    attention_heads: float = Field(default=0.0, ge=0, lt=1)
    ffn_channels: float = Field(default=0.0, ge=0, lt=1)
    criterion: Literal["activation", "magnitude"] = "activation"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.criterion == "activation"

    @model_validator(mode="after")
    def _removes_something(self) -> StructuredConfig:
        if self.attention_heads == 0 and self.ffn_channels == 0:
            raise ValueError("structured removes nothing: set attention_heads or ffn_channels > 0")
        return self


class StudentSpec(BaseModel):
    """Which model learns: `num_layers` blocks kept from the teacher (evenly spaced, with their
    weights, as DistilBERT did) or another registered model (`model_id`) with the same vocabulary."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int | None = Field(default=None, ge=1, le=1024)
    model_id: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentSpec:
        if (self.num_layers is None) == (self.model_id is None):
            raise ValueError("student takes exactly one of num_layers or model_id")
        return self


class LossWeights(BaseModel):
    """How the distillation loss terms add up. `kl`: KL divergence of the temperature-softened
    logits (x T^2); for an encoder without an LM head, 1 - cosine of the mean-pooled embeddings.
    `hidden`: MSE of mapped hidden states, relative to the teacher's mean square. `lm`: the plain
    next-token loss (causal models only)."""

    model_config = ConfigDict(extra="forbid")

    kl: float = Field(default=1.0, ge=0, le=1000)
    hidden: float = Field(default=1.0, ge=0, le=1000)
    lm: float = Field(default=0.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _something(self) -> LossWeights:
        if self.kl == 0 and self.hidden == 0 and self.lm == 0:
            raise ValueError("loss_weights are all zero: nothing to learn from")
        return self


class DistillConfig(StageConfig):
    """Knowledge distillation: the model coming into the stage is the teacher, a smaller student is
    trained on text to match it. Without `student`, the model as it comes in (after an earlier
    `structured` or pruning stage) is the student and the model the job started from teaches it."""

    rescales_weights: ClassVar[bool] = True
    streams: ClassVar[bool] = False  # training holds the whole model and its gradients

    method: Literal["distill"] = "distill"
    student: StudentSpec | None = None
    dataset_id: str | None = Field(
        default=None, description="training text; None: the built-in calibration set for the task"
    )
    steps: int = Field(default=200, ge=1, le=1_000_000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    micro_batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="split each batch to save memory (accumulated)"
    )
    seq_len: int = Field(default=256, ge=8, le=32_768)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int | None = Field(default=None, ge=0, description="None: 10% of steps")
    max_grad_norm: float = Field(default=1.0, gt=0)
    temperature: float = Field(default=2.0, gt=0, le=100)
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    eval_every: int | None = Field(default=None, ge=1, description="None: 5 times per run")
    checkpoint_every: int = Field(default=50, ge=1)
    seed: int = Field(default=0, ge=0)

    def needs_original(self) -> bool:
        return self.student is None

    def referenced_ids(self) -> dict[str, list[str]]:
        student_model = self.student.model_id if self.student is not None else None
        return {
            "model_ids": [student_model] if student_model is not None else [],
            "dataset_ids": [self.dataset_id] if self.dataset_id is not None else [],
        }

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> DistillConfig:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}"
            )
        return self


STAGE_CONFIGS: tuple[type[StageConfig], ...] = (
    DynamicInt8Config,
    SmoothQuantConfig,
    W8A8Config,
    RtnConfig,
    GptqConfig,
    AwqConfig,
    Fp8Config,
    MagnitudeConfig,
    WandaConfig,
    SparseGptConfig,
    StructuredConfig,
    DistillConfig,
)

METHOD_NAMES = frozenset(config.model_fields["method"].default for config in STAGE_CONFIGS)
Stage = Annotated[Union[STAGE_CONFIGS], Field(discriminator="method")]  # noqa: UP007


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(min_length=1, max_length=16)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_export_format(self) -> Recipe:
        families: dict[str, str] = {}
        for stage in self.stages:
            if stage.family is not None:
                families.setdefault(stage.family, stage.method)
        if len(families) > 1:
            first, second = list(families.values())[:2]
            raise ValueError(
                f"{first} and {second} cannot be combined in one recipe: one artifact holds one "
                f"quantized format ({' / '.join(families)})"
            )
        return self

    @model_validator(mode="after")
    def _float_methods_first(self) -> Recipe:
        quantized_by = None
        for stage in self.stages:
            if stage.rescales_weights and quantized_by is not None:
                raise ValueError(
                    f"{stage.method} changes float weights, so it must come before {quantized_by} "
                    "(it would undo the quantized weights)"
                )
            if stage.family is not None:
                quantized_by = quantized_by or stage.method
        for index, stage in enumerate(self.stages):
            if not stage.needs_original():
                continue
            if not any(earlier.shrinks for earlier in self.stages[:index]):
                shrinking = (
                    config.model_fields["method"].default
                    for config in STAGE_CONFIGS
                    if config.shrinks
                )
                raise ValueError(
                    "distill without a student trains the model as it comes in against the "
                    f"original: put a shrinking stage ({', '.join(shrinking)}) before it, or give "
                    "student.num_layers or student.model_id"
                )
        if any(
            stage.method == "smoothquant" and later.method == "distill"
            for i, stage in enumerate(self.stages)
            for later in self.stages[i + 1 :]
        ):
            raise ValueError("distill after smoothquant would undo the smoothing: swap them")
        if self.stages[-1].method == "smoothquant":
            raise ValueError(
                "smoothquant only prepares the weights for quantization: follow it with w8a8 "
                "(or another quantizing stage)"
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


def selected_linear_names(stage: StageConfig, linear_names: list[str]) -> list[str]:
    """The Linear layers a stage targets, from their names alone (what
    `layer_selection.linear_layers` finds on the module tree), so the API can check a recipe
    against a model's shapes without loading it."""
    targeted, _ = select_layers(
        dict.fromkeys(linear_names, "Linear"),
        modules=stage.modules,
        ignore=stage.ignore,
        blocks=block_prefix_from_names(linear_names),
    )
    return targeted


def group_size_conflicts(stage: StageConfig, linear_shapes: dict[str, list[int]]) -> list[str]:
    """Targeted layers whose input width the stage's group size does not divide."""
    if not isinstance(stage, WeightOnlyConfig) or stage.group_size == -1:
        return []
    return [
        name
        for name in selected_linear_names(stage, list(linear_shapes))
        if linear_shapes[name][1] % stage.group_size
    ]


def shapes_after(stage: StageConfig, linear_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The Linear shapes a stage leaves behind, where it changes them at all: `structured`
    removing FFN channels (the same number in every block, rounded as the stage rounds). Removed
    heads are not predicted: the head size is not in the shapes."""
    if not isinstance(stage, StructuredConfig) or not stage.ffn_channels:
        return linear_shapes
    fraction = stage.ffn_channels
    blocks = block_prefix_from_names(list(linear_shapes))
    shapes = {}
    for name, (out_features, in_features) in linear_shapes.items():
        inner = name_in_block(name, blocks) if blocks is not None else None
        if inner in FFN_WIDENING:
            out_features -= int(fraction * out_features + 0.5)
        elif inner in FFN_NARROWING:
            in_features -= int(fraction * in_features + 0.5)
        shapes[name] = [out_features, in_features]
    return shapes


def default_metrics(task: str) -> list[str]:
    if task == "causal-lm":
        return ["perplexity", "latency", "size"]
    return ["embedding_cosine", "latency", "size"]
