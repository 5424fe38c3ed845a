"""Dynamic INT8: int8 weights, activations quantized on the fly at run time (CPU).

Weights are quantized once, symmetrically, per output channel (or per tensor): w ≈ scale * q with
q = round(w / scale) in [-127, 127] and scale = max|w| / 127, so the largest weight of a row is
represented exactly and nothing is clipped. Activations need no calibration: each forward pass
computes their range and quantizes them to 8 bits before an int8 x int8 matrix multiply.

The layers become torch's dynamic int8 Linear (`DynamicInt8Linear` in `runtime/int8.py`), whose
int8 kernels exist on CPU only, so the quantized model lives on CPU. The same functions build the
layer here and when an exported artifact is loaded, so the artifact reproduces this model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import DynamicInt8Config
from workers.compression.registry import StageContext, register_method
from workers.compression.runtime.int8 import FULL_RANGE_ACTIVATIONS, int8_linear


def quantize_weight(
    weight: torch.Tensor, *, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 weights and float32 scales, [out, 1] per channel or [1] per tensor."""
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax().reshape(1)
    # An all-zero row would give scale 0 and a division by zero; any positive scale represents it.
    scale = (amax / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


@register_method(DynamicInt8Config)
def dynamic_int8(model: nn.Module, config: DynamicInt8Config, context: StageContext) -> dict:
    targeted, skipped = linear_layers(model, config)
    if not targeted:
        raise ValueError("dynamic_int8 matched no Linear layer; check `modules` and `ignore`")
    # The int8 kernels are CPU-only; moving the whole model keeps it runnable end to end.
    model.to("cpu")
    for step, name in enumerate(targeted, start=1):
        linear = model.get_submodule(name)
        q, scale = quantize_weight(linear.weight, per_channel=config.per_channel)
        model.set_submodule(name, int8_linear(q, scale, linear.bias))
        context.report(step, len(targeted), f"quantized {name}", unit="layer")
    return {
        "device": "cpu",
        "activation_bits": 8 if FULL_RANGE_ACTIVATIONS else 7,
        "quantized_layers": len(targeted),
        "quantized": targeted,
        "skipped": skipped,
    }
