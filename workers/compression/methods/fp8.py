"""FP8: weights as 8-bit floats (E4M3: 4 exponent bits, 3 mantissa bits, largest value 448), one
float32 scale per output channel; activations in the model's float type (`none`) or cast to FP8
with one scale per token at run time (`dynamic`).

Floats spend their bits on range rather than on uniform steps, so a weight's relative error is
about the same (≤ 2⁻⁴) whatever its size: outliers cost nothing. Scale per row: s = max|w| / 448,
so the largest weight of each row maps to FP8's largest value and nothing is clipped.

FP8 matrix multiplies need FP8 tensor cores; where there are none the stage still runs and the
artifact is the same, but it computes in float from the FP8 values (`runtime/fp8.py`, where
`Fp8Linear` lives).
"""

from __future__ import annotations

from torch import nn

from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import Fp8Config
from workers.compression.registry import StageContext, register_method
from workers.compression.runtime.fp8 import Fp8Linear, fp8_matmul_available, fp8_scale, to_fp8
from workers.compression.streaming import resident_layers


def fp8_linear(linear: nn.Linear, *, dynamic_activations: bool) -> Fp8Linear:
    weight = linear.weight.detach()
    scale = fp8_scale(weight.abs().amax(dim=1, keepdim=True))
    return Fp8Linear(
        to_fp8(weight, scale), scale, linear.bias, dynamic_activations=dynamic_activations
    )


@register_method(Fp8Config)
def fp8(model: nn.Module, config: Fp8Config, context: StageContext) -> dict:
    targeted, skipped = linear_layers(model, config)
    if not targeted:
        raise ValueError("fp8 matched no Linear layer; check `modules` and `ignore`")
    errors = []
    for step, (name, linear) in enumerate(resident_layers(model, targeted), start=1):
        layer = fp8_linear(linear, dynamic_activations=config.activations == "dynamic")
        dequantized = layer.weight.float() * layer.weight_scale
        errors.append(
            ((dequantized - linear.weight.float()).norm() / linear.weight.float().norm()).item()
        )
        model.set_submodule(name, layer)
        context.report(step, len(targeted), f"quantized {name}", unit="layer")
    device = next(model.parameters()).device
    return {
        "activations": config.activations,
        "quantized_layers": len(targeted),
        "quantized": targeted,
        "skipped": skipped,
        "mean_relative_weight_error": sum(errors) / len(errors),
        "fp8_matmul": fp8_matmul_available(device),
    }
