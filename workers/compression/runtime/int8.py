"""Int8 weights with int8 activations: the matrix multiplies themselves run in integers.

Two runtime modules, one stored layout (compressed-tensors `int-quantized`: int8 weights, float32
scales [out, 1] per channel or [1] per tensor):

- `W8A8Linear` (the `w8a8` method): activations quantized symmetrically to int8, x ≈ q_x · s_x,
  with one calibrated scale per layer input (static) or one per token computed at run time
  (dynamic); then y = (q_x q_wᵀ) · s_x s_wᵀ + b with an int8 x int8 → int32 product. It is both
  the in-memory layer and the runtime one `export.load_artifact` builds, so the job measures what
  users run. On x86 CPUs with VNNI, static layers use fbgemm's int8 kernel with a float output
  (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`); otherwise, and for per-token
  scales, `torch._int_mm`. Both compute the integer product exactly, on the codes compressed-tensors and
  vLLM define (round-half-even of x / s_x, clamped to [-128, 127]), so they agree with each other
  and with compressed-tensors' reference up to float rounding of the rescale
  (`tests/engine/test_w8a8_convention.py`).
- `DynamicInt8Linear` (the `dynamic_int8` method): `torch.ao.nn.quantized.dynamic.Linear` (a
  subclass that picks the activation range, see below), whose forward runs the fbgemm (x86) or
  qnnpack (ARM) int8 kernels, which quantize activations per tensor. Those kernels exist on CPU
  only, so such a model lives on CPU. The same functions below build the layer in the method and
  when an exported artifact is loaded, so the artifact reproduces the method's model exactly.
"""

from __future__ import annotations

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

# torch quantizes dynamic activations to 7 bits on x86 (`reduce_range`) because fbgemm's AVX2 int8
# dot product (vpmaddubsw) adds pairs of u8*s8 products in int16 and can saturate. With VNNI
# (vpdpbusd) products accumulate in int32, so the full 8 bits are safe, and they halve the
# activation error: all-MiniLM-L6-v2's embedding cosine to FP32 goes from 0.975 to 0.992.
# qnnpack (ARM) always uses the full range.
FULL_RANGE_ACTIVATIONS: bool = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()

# Symmetric int8 as compressed-tensors defines it: scale = max|x| / ((127 - (-128)) / 2), codes
# clamped to [-128, 127].
_HALF_RANGE = 127.5
_LOW, _HIGH = -128, 127


def activation_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The int8 scale for values up to `absmax` (any shape), never zero."""
    return (absmax.float() / _HALF_RANGE).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_activations(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp_(_LOW, _HIGH).to(torch.int8)


def int8_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qx [m, k] int8 @ qw [n, k]ᵀ int8 → int32 [m, n], exactly."""
    if qx.device.type == "cpu" or (
        qx.shape[0] > 16 and qx.shape[1] % 8 == 0 and qw.shape[0] % 8 == 0
    ):
        return torch._int_mm(qx, qw.t())
    # CUDA's int8 kernel wants more than 16 rows and multiples of 8; float64 is exact here.
    return (qx.double() @ qw.double().t()).to(torch.int32)


class W8A8Linear(nn.Module):
    """y = x Wᵀ + b with int8 weights and int8 activations (see the module docstring)."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale.float().reshape(1))
        else:
            self.input_scale = None
        if bias is not None:
            self.register_buffer("bias", bias.detach().float())
        else:
            self.bias = None
        self._packed = None  # fbgemm's prepacked weight, built on the first CPU call

    @property
    def dynamic(self) -> bool:
        return self.input_scale is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.dynamic:
            scale = activation_scale(x2.detach().abs().amax(dim=1, keepdim=True))
        else:
            scale = self.input_scale
        if not self.dynamic and x2.device.type == "cpu" and FULL_RANGE_ACTIVATIONS:
            y = self._fbgemm(x2.float())
        else:
            product = int8_matmul(quantize_activations(x2, scale), self.weight)
            y = product.float() * (scale * self.weight_scale.reshape(1, -1))
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            qweight = torch.quantize_per_channel(
                self.weight.float() * self.weight_scale,
                self.weight_scale.reshape(-1).double(),
                torch.zeros(self.out_features, dtype=torch.long),
                axis=0,
                dtype=torch.qint8,
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        # Symmetric int8 codes [-128, 127] are fbgemm's uint8 codes with zero point 128. fbgemm
        # rounds x * (1 / scale), which differs from compressed-tensors' and vLLM's x / scale near
        # half-way points (a 1-ulp difference there flips a code); handing it values already on
        # the grid (q · scale, which it maps back to q exactly) makes the codes theirs.
        scale = self.input_scale
        on_grid = torch.round(x / scale).clamp_(_LOW, _HIGH).mul_(scale)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            on_grid, scale.item(), 128, self._packed
        )

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: pack again from the buffers
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        activations = "dynamic per token" if self.dynamic else "static per tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={activations}"


class DynamicInt8Linear(nnqd.Linear):
    """torch's dynamic int8 Linear, with 8-bit activations where the CPU kernel cannot overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(
            x, self._packed_params._packed_params, reduce_range=not FULL_RANGE_ACTIVATIONS
        )
        return y.to(x.dtype)


def int8_linear(
    q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> DynamicInt8Linear:
    """A dynamic-quantized Linear holding exactly these int8 weights and scales."""
    out_features, in_features = q.shape
    dequantized = q.float() * scale  # exact: round(dequantized / scale) gives q back
    if scale.dim() == 1:  # [1]: one scale for the tensor
        qweight = torch.quantize_per_tensor(dequantized, scale.item(), 0, torch.qint8)
    else:
        qweight = torch.quantize_per_channel(
            dequantized,
            scale.reshape(-1).double(),
            torch.zeros(out_features, dtype=torch.long),
            axis=0,
            dtype=torch.qint8,
        )
    layer = DynamicInt8Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
    layer.set_weight_bias(qweight, None if bias is None else bias.detach().float().cpu())
    return layer


def int8_weight_and_scale(layer: nnqd.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The (q, scale) a dynamic-quantized Linear holds: int8 weights and float32 scales, [out, 1]
    per channel or [1] per tensor (the shapes `methods.dynamic_int8.quantize_weight` gives)."""
    qweight = layer.weight()
    if qweight.qscheme() == torch.per_tensor_affine:
        scale = torch.tensor([qweight.q_scale()], dtype=torch.float32)
    else:
        scale = qweight.q_per_channel_scales().float().reshape(-1, 1)
    return qweight.int_repr(), scale
