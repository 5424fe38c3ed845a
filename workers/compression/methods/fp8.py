"""FP8: weights as 8-bit floats (E4M3: 4 exponent bits, 3 mantissa bits, largest value 448), one
float32 scale per output channel; activations in the model's float type (`none`) or cast to FP8
with one scale per token at run time (`dynamic`).

Floats spend their bits on range rather than on uniform steps, so a weight's relative error is
about the same (≤ 2⁻⁴) whatever its size: outliers cost nothing. Scale per row: s = max|w| / 448,
so the largest weight of each row maps to FP8's largest value and nothing is clipped.

FP8 matrix multiplies need FP8 tensor cores (NVIDIA compute capability 8.9 and up: Ada, Hopper).
There, with `dynamic` activations, `Fp8Linear` multiplies in FP8 with `torch._scaled_mm` (weight-only
FP8 is dequantized: torch has no FP8 x float kernel); vLLM runs FP8 kernels on the exported
compressed-tensors `float-quantized` folder. Elsewhere (CPUs, older GPUs) the stage still runs and
the artifact is the same, but the runtime computes in float from the FP8 values (weights
dequantized, activations rounded to FP8 and back when `dynamic`): the numbers are FP8's, the
speed is float's, and `load_artifact` says so in `slimformer_runtime`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import Fp8Config
from workers.compression.registry import StageContext, register_method

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to the nearest E4M3 value (saturating at ±448)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    return (absmax.float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_matmul_available(device: torch.device) -> bool:
    """Whether this device multiplies FP8 in hardware (compute capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """y = x Wᵀ + b with FP8 weights (see the module docstring)."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        dynamic_activations: bool,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dynamic_activations = dynamic_activations
        self.register_buffer("weight", weight.to(FP8))
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        if bias is not None:
            self.register_buffer("bias", bias.detach().float())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.dynamic_activations:
            scale = fp8_scale(x2.detach().abs().amax(dim=1, keepdim=True))
            x8 = to_fp8(x2, scale)
            if self._hardware(x2):
                y = torch._scaled_mm(
                    x8,
                    self.weight.t(),
                    scale_a=scale,
                    scale_b=self.weight_scale.reshape(1, -1),
                    out_dtype=torch.bfloat16,
                    bias=None if self.bias is None else self.bias.to(torch.bfloat16),
                )
                return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            x2 = x8.float() * scale
        weight = self.weight.float() * self.weight_scale
        y = F.linear(x2.float(), weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _hardware(self, x2: torch.Tensor) -> bool:
        # _scaled_mm wants dimensions that are multiples of 16.
        return (
            fp8_matmul_available(x2.device)
            and x2.shape[0] % 16 == 0
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        )

    def extra_repr(self) -> str:
        activations = "fp8 per token" if self.dynamic_activations else "float"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={activations}"


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
    for step, name in enumerate(targeted, start=1):
        linear = model.get_submodule(name)
        layer = fp8_linear(linear, dynamic_activations=config.activations == "dynamic")
        dequantized = layer.weight.float() * layer.weight_scale
        errors.append(
            ((dequantized - linear.weight.float()).norm() / linear.weight.float().norm()).item()
        )
        model.set_submodule(name, layer)
        context.report(step, len(targeted), f"quantized {name}")
    device = next(model.parameters()).device
    return {
        "activations": config.activations,
        "quantized_layers": len(targeted),
        "quantized": targeted,
        "skipped": skipped,
        "mean_relative_weight_error": sum(errors) / len(errors),
        "fp8_matmul": fp8_matmul_available(device),
    }
