"""Dynamic INT8: int8 weights, activations quantized on the fly at run time (CPU).

Weights are quantized once, symmetrically, per output channel (or per tensor): w ≈ scale * q with
q = round(w / scale) in [-127, 127] and scale = max|w| / 127, so the largest weight of a row is
represented exactly and nothing is clipped. Activations need no calibration: each forward pass
computes their range and quantizes them to 8 bits before an int8 x int8 matrix multiply.

The layers become `torch.ao.nn.quantized.dynamic.Linear` (a subclass that picks the activation
range, see below), whose forward runs the fbgemm (x86) or qnnpack (ARM) int8 kernels. Those kernels
exist on CPU only, so the quantized model lives on CPU. The same functions below build the layer
here and when an exported artifact is loaded, so the artifact reproduces this model exactly.
"""

from __future__ import annotations

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import DynamicInt8Config
from workers.compression.registry import StageContext, register_method

# torch quantizes dynamic activations to 7 bits on x86 (`reduce_range`) because fbgemm's AVX2 int8
# dot product (vpmaddubsw) adds pairs of u8*s8 products in int16 and can saturate. With VNNI
# (vpdpbusd) products accumulate in int32, so the full 8 bits are safe, and they halve the
# activation error: all-MiniLM-L6-v2's embedding cosine to FP32 goes from 0.975 to 0.992.
# qnnpack (ARM) always uses the full range.
FULL_RANGE_ACTIVATIONS: bool = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


class DynamicInt8Linear(nnqd.Linear):
    """torch's dynamic int8 Linear, with 8-bit activations where the CPU kernel cannot overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(
            x, self._packed_params._packed_params, reduce_range=not FULL_RANGE_ACTIVATIONS
        )
        return y.to(x.dtype)


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
    """The (q, scale) a dynamic-quantized Linear holds, in `quantize_weight`'s shapes."""
    qweight = layer.weight()
    if qweight.qscheme() == torch.per_tensor_affine:
        scale = torch.tensor([qweight.q_scale()], dtype=torch.float32)
    else:
        scale = qweight.q_per_channel_scales().float().reshape(-1, 1)
    return qweight.int_repr(), scale


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
        context.report(step, len(targeted), f"quantized {name}")
    return {
        "device": "cpu",
        "activation_bits": 8 if FULL_RANGE_ACTIVATIONS else 7,
        "quantized_layers": len(targeted),
        "quantized": targeted,
        "skipped": skipped,
    }
