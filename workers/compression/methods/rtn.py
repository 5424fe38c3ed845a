"""Round-to-nearest weight-only quantization: each group of weights scaled and rounded on its own.

No calibration data: a group's scale (and zero point) comes from its min and max (`quant.py`).
The layers stay nn.Linear with dequantized weights and carry the exact integers (`quant.ATTRIBUTE`).
"""

from __future__ import annotations

from torch import nn

from workers.compression.layer_selection import linear_layers
from workers.compression.quant import (
    LAZY,
    attach,
    quantize_groups,
    relative_error_of,
    resolve_group_size,
)
from workers.compression.recipe import RtnConfig, WeightOnlyConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.streaming import resident_layers


def weight_only_targets(model: nn.Module, config: WeightOnlyConfig) -> tuple[list[str], list[str]]:
    """(targeted, skipped) Linear names, after checking that `group_size` tiles every targeted
    layer's input width, so that a recipe that cannot apply changes nothing."""
    targeted, skipped = linear_layers(model, config)
    if not targeted:
        raise ValueError(f"{config.method} matched no Linear layer; check `modules` and `ignore`")
    for name in targeted:
        resolve_group_size(model.get_submodule(name).in_features, config.group_size, layer=name)
    return targeted, skipped


@register_method(RtnConfig)
def rtn(model: nn.Module, config: RtnConfig, context: StageContext) -> dict:
    targeted, skipped = weight_only_targets(model, config)
    errors: dict[str, float] = {}
    for step, (name, linear) in enumerate(resident_layers(model, targeted), start=1):
        # A lazy layer's weight is replaced, not written, when quantized: no copy needed.
        weight = linear.weight.detach()
        original = weight if getattr(linear, LAZY, False) else weight.clone()
        quantized = quantize_groups(
            original,
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            layer=name,
        )
        attach(linear, quantized)
        errors[name] = relative_error_of(original, quantized)
        context.report(step, len(targeted), f"quantized {name}", unit="layer")
    return {
        "quantized_layers": len(targeted),
        "quantized": targeted,
        "skipped": skipped,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "mean_relative_weight_error": sum(errors.values()) / len(errors),
        "layers": {name: {"relative_weight_error": error} for name, error in errors.items()},
    }
