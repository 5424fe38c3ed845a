"""FP8 weights (E4M3: 4 exponent bits, 3 mantissa bits, largest value 448) with one float32 scale
per output channel; activations in the model's float type, or cast to FP8 with one scale per token
at run time (`dynamic_activations`). Stored as compressed-tensors `float-quantized`.

FP8 matrix multiplies need FP8 tensor cores (NVIDIA compute capability 8.9 and up: Ada, Hopper).
There, with dynamic activations, `Fp8Linear` multiplies in FP8 with `torch._scaled_mm` (weight-only
FP8 is dequantized: torch has no FP8 x float kernel); vLLM runs FP8 kernels on the exported
compressed-tensors `float-quantized` folder. Elsewhere (CPUs, older GPUs) the `fp8` stage still
runs and the artifact is the same, but the runtime computes in float from the FP8 values (weights
dequantized, activations rounded to FP8 and back when dynamic): the numbers are FP8's, the speed
is float's, and `load_artifact` says so in `slimformer_runtime`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
