"""Which function applies which stage config (torchao's `register_quantize_module_handler`, shrunk).

A method is one pydantic config class in `recipe.py` and one function registered here against it:

    @register_method(DynamicInt8Config)
    def dynamic_int8(model, config, context) -> dict: ...

The function changes `model` in place and returns a JSON-able summary of what it did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.compression.calibration import BlockCheckpoint, Handler, run_blockwise
from workers.compression.progress import ProgressFn, ProgressUpdate
from workers.compression.recipe import StageConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class StageContext:
    """What a method gets besides the model and its config."""

    method: str
    # Never empty for a stage whose config `needs_calibration`: the engine refuses the recipe first.
    calibration: list[torch.Tensor] | None
    stage_index: int
    num_stages: int
    progress: ProgressFn | None
    # Where a layer-by-layer stage records finished blocks so a killed run resumes (None: nowhere).
    checkpoint: BlockCheckpoint | None = None
    # Text, tokenizer and other models, for the stages that train (None: not given).
    resources: StageResources | None = None
    # The model as the recipe received it, before its first stage (kept only when a stage needs it).
    original: nn.Module | None = None
    # Set by a stage whose result is another module than the one it got (a distilled student model).
    replaced_by: nn.Module | None = None

    def report(
        self,
        step: int,
        total_steps: int,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        unit: str = "step",
    ) -> None:
        # The callback may raise to cancel the job; that must reach the caller, so no try here.
        if self.progress is not None:
            self.progress(
                ProgressUpdate(
                    stage=self.method,
                    stage_index=self.stage_index,
                    num_stages=self.num_stages,
                    step=step,
                    total_steps=total_steps,
                    message=message,
                    data=data,
                    unit=unit,
                )
            )

    def run_blockwise(self, model: nn.Module, handler: Handler, **options: Any) -> list[dict]:
        """`calibration.run_blockwise` on this stage's calibration batches, reporting its progress
        and saving its finished blocks to its checkpoint; `options` as that function takes them."""
        return run_blockwise(
            model,
            self.calibration,
            handler,
            progress=lambda step, total, message: self.report(step, total, message, unit="block"),
            checkpoint=self.checkpoint,
            **options,
        )


@dataclass
class StageResources:
    """What training stages read besides calibration batches: `texts(dataset_id)` gives a dataset's
    texts (None: the default training text for the model's task), `load_model(model_id)` another
    registered model, on the device the job runs on."""

    tokenizer: Any
    texts: Callable[[str | None], list[str]]
    load_model: Callable[[str], nn.Module] | None = None

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: list[str]) -> StageResources:
        """For plain Python calls: one list of texts serves every stage that asks for text."""
        return cls(tokenizer=tokenizer, texts=lambda dataset_id: texts)


MethodFn = Callable[["nn.Module", Any, StageContext], dict]

_METHODS: dict[type[StageConfig], MethodFn] = {}


def register_method(config_cls: type[StageConfig]) -> Callable[[MethodFn], MethodFn]:
    def register(fn: MethodFn) -> MethodFn:
        if config_cls in _METHODS:
            raise ValueError(f"{config_cls.__name__} already has a method registered")
        _METHODS[config_cls] = fn
        return fn

    return register


def method_for(config: StageConfig) -> MethodFn:
    try:
        return _METHODS[type(config)]
    except KeyError:
        raise ValueError(f"no method is registered for {type(config).__name__}") from None
