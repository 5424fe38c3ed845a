"""The CPU runtime for weight-only quantized layers: real int4 and int8 kernels, no fake quantization.

A weight-only layer is stored as integer codes with float scales (and zero points when asymmetric),
one scale per group of `group_size` input channels: w = (codes - zero_point) * scale. Here it
becomes a module that keeps the weights in low precision and multiplies with PyTorch's CPU
weight-only kernels:

- `Int4WeightLinear`: `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`,
  which computes x @ w.T with w = (u - 8) * scale + zero for unsigned 4-bit u. Any code of at most
  4 bits maps onto it exactly: symmetric codes c give u = c + 8 and zero = 0; asymmetric codes give
  u = c and zero = (8 - zero_point) * scale. The kernel needs N % 16 == 0 and a group of 32, 64,
  128 or 256; a larger group that one of those divides (per-channel included) is the same scale
  repeated, so it is exact too.
- `Int8WeightLinear`: `aten._weight_int8pack_mm(x, q, scale)`, x @ (q * scale[:, None]).T with one
  scale per output channel. Asymmetric codes fold their zero point in (q = c - zp) when that fits
  int8, as it always does below 8 bits; otherwise they are shifted (q = c - 128, z = zp - 128) and
  x @ ((q - z) * s).T = int8pack_mm(x, q, s) - sum(x) * (z * s) costs one more vector product.

Both kernels are fast only for bfloat16 activations (float32 ones take a path 40-140 x slower on
SmolLM2's 576 x 1536 layers), so the modules cast activations to bfloat16 for the product and the
result back to the input's dtype; scales and zeros are bfloat16 too. That rounding (8 significant
bits) is the only difference from the dequantized float model. Layers neither kernel can run
(grouped 5-8 bit weights, shapes the int4 kernel refuses) become an nn.Linear holding the
dequantized weight, and say why.

Where they pay off: the kernels read 4 or 8 bits per weight instead of 32, which wins when reading
weights is the cost, i.e. few rows at a time (a decoding step). On a 2-core AVX-512/AMX Xeon,
SmolLM2-135M's forward over 1 token took 0.60 x (int4) and 0.83 x (int8) the float32 time, but over
1 x 128 tokens 1.4 x / 1.6 x and over 32 x 128 tokens 1.6 x / 1.8 x: with many rows the product is
compute-bound, and these kernels are about half as fast as MKL's float32 GEMM there.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from workers.compression.quant import ATTRIBUTE, QuantizedWeight, dequantize

KERNEL_DTYPE = torch.bfloat16
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes `_weight_int4pack_mm_for_cpu` accepts


class Int4WeightLinear(nn.Module):
    """y = x @ w.T + bias with w held as packed 4-bit codes and bfloat16 group scales and zeros."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.kernel_group_size = int4_kernel_group(weight)
        if self.kernel_group_size is None:
            raise ValueError(f"the int4 CPU kernel cannot run {tuple(weight.codes.shape)} weights")
        codes = weight.codes.to(torch.int32)
        scale = weight.scale.float()
        if weight.symmetric:
            unsigned = codes + 8
            zero = torch.zeros_like(scale)
        else:
            unsigned = codes
            zero = (8 - weight.zero_point.float()) * scale
        repeat = weight.group_size // self.kernel_group_size
        # [groups, out, 2]: the kernel's layout, one (scale, zero) pair per group and output row.
        scales_and_zeros = torch.stack(
            (scale.repeat_interleave(repeat, dim=1), zero.repeat_interleave(repeat, dim=1)), dim=-1
        )
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
        )
        self.register_buffer(
            "scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        )
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel reads a 2-D contiguous matrix only (a 3-D one crashes the process).
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, self.kernel_group_size, self.scales_and_zeros
        )
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel_group_size={self.kernel_group_size}, bias={self.bias is not None}"
        )


class Int8WeightLinear(nn.Module):
    """y = x @ w.T + bias with w held as int8 codes and one bfloat16 scale per output channel."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        if weight.scale.shape[1] != 1 or weight.bits > 8:
            raise ValueError("the int8 CPU kernel runs per-channel weights of at most 8 bits")
        codes = weight.codes.to(torch.int32)
        scale = weight.scale.float().reshape(-1)
        zero_term = None
        if not weight.symmetric:
            zero_point = weight.zero_point.to(torch.int32)  # [out, 1]
            if (codes - zero_point).abs().max() <= 127:  # always so below 8 bits
                codes = codes - zero_point  # the zero point folded in: exact, no extra term
            else:
                # Shift the unsigned codes into int8 and subtract sum(x) * (zero_point - 128) *
                # scale. Kept in float32: the two terms can be far larger than their difference.
                codes = codes - 128
                zero_term = (zero_point.reshape(-1) - 128).float() * scale
        self.register_buffer("weight_int8", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        self.register_buffer("zero_term", zero_term)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale).to(x.dtype)
        if self.zero_term is not None:
            # The same bfloat16 activations the kernel saw, so the identity holds term for term.
            sums = rows.float().sum(dim=1, keepdim=True)
            y = y - (sums * self.zero_term).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"zero_term={self.zero_term is not None}, bias={self.bias is not None}"
        )


def int4_kernel_group(weight: QuantizedWeight) -> int | None:
    """The int4 kernel's group size that runs these weights exactly, or None."""
    out_features, in_features = weight.codes.shape
    if weight.bits > 4 or out_features % 16:
        return None
    return next(
        (group for group in INT4_KERNEL_GROUPS if weight.group_size % group == 0),
        None,
    )


@functools.cache
def cpu_kernels() -> frozenset[str]:
    """Which weight-only kernels this CPU build runs ("int4", "int8"), probed once on a tiny
    product checked against the float result."""
    available = set()
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    x = torch.randn(2, 64, generator=generator)
    codes = torch.randint(-8, 8, (16, 64), dtype=torch.int8, generator=generator)
    scale = torch.rand(16, 1, generator=generator) / 8 + 0.01
    weight = QuantizedWeight(codes, scale, None, bits=4, group_size=64, symmetric=True)
    expected = x @ dequantize(weight).T
    for name, module_class in (("int4", Int4WeightLinear), ("int8", Int8WeightLinear)):
        try:
            with torch.inference_mode():
                actual = module_class(weight, None)(x)
        except (RuntimeError, NotImplementedError):
            continue
        if torch.allclose(actual, expected, rtol=0.02, atol=0.02 * expected.abs().max().item()):
            available.add(name)
    return frozenset(available)


def dequantized_linear(weight: QuantizedWeight, bias: torch.Tensor | None) -> nn.Linear:
    """The engine's in-memory form of a weight-only layer: an nn.Linear holding the dequantized
    weight, with the codes attached (so it can be exported again)."""
    out_features, in_features = weight.codes.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(dequantize(weight), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    setattr(linear, ATTRIBUTE, weight)
    return linear


def runtime_linear(
    weight: QuantizedWeight, bias: torch.Tensor | None, *, kernels: frozenset[str] | None = None
) -> tuple[nn.Module, str]:
    """(module, kernel): the CPU module that runs these weights, and what it runs: "int4",
    "int8", or "float: <why no kernel fits>" for the dequantized fallback. `kernels`: the ones
    this CPU runs (default: probed)."""
    kernels = cpu_kernels() if kernels is None else kernels
    if "int4" in kernels and int4_kernel_group(weight) is not None:
        return Int4WeightLinear(weight, bias), "int4"
    if "int8" in kernels and weight.scale.shape[1] == 1:
        return Int8WeightLinear(weight, bias), "int8"
    if not kernels:
        reason = "this CPU build runs neither weight-only kernel"
    else:
        reason = (
            f"no kernel for {weight.bits}-bit weights in groups of {weight.group_size} with "
            f"{weight.codes.shape[0]} outputs (int4: at most 4 bits, outputs a multiple of 16, "
            "groups a multiple of 32; int8: one scale per output channel)"
        )
    return dequantized_linear(weight, bias), f"float: {reason}"
