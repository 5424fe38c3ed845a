"""Integer weight quantization in groups: pure functions on tensors, shared by RTN and GPTQ.

A weight matrix W [out, in] is cut along its input dimension into groups of `group_size`
consecutive columns; each (row, group) pair has one float scale s (and, asymmetric, one integer
zero point z), and each weight is stored as a `bits`-bit integer code q:

    symmetric:   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)        w ≈ q * s
    asymmetric:  q = clamp(round(w / s) + z, 0, 2^b - 1)               w ≈ (q - z) * s

`group_size` -1 means one group per row (per output channel).

What a weight-only quantized model holds in memory (what `export` reads): every quantized layer
stays an `nn.Linear` whose `.weight` holds the *dequantized* values, so the model runs as it is for
evaluation, and carries the exact integers as `module.slimformer_weight_quant`, a
`QuantizedWeight`. `dequantize(module.slimformer_weight_quant)` equals `module.weight` bit for bit:
the methods build the weight by calling `dequantize`, never by their own arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The attribute a quantized nn.Linear carries (see the module docstring).
ATTRIBUTE = "slimformer_weight_quant"
# Marks a Linear of a streamed block onloaded lazily (`streaming.BlockStore.onload`): its weight
# is as stored, or on the meta device once quantized (its forward dequantizes the codes).
LAZY = "slimformer_lazy"


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [out, in]; int8 in [-2^(b-1), 2^(b-1)-1] symmetric, uint8 in [0, 2^b-1]
    scale: torch.Tensor  # [out, n_groups], the weight's float dtype
    zero_point: torch.Tensor | None  # [out, n_groups] uint8 in [0, 2^b-1]; None when symmetric
    bits: int
    group_size: int  # resolved: in_features when the config said -1
    symmetric: bool

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Plain named tensors (safetensors-ready), for checkpoints; `from_tensors` reads them."""
        tensors = {
            f"{prefix}codes": self.codes,
            f"{prefix}scale": self.scale,
            f"{prefix}format": torch.tensor([self.bits, self.group_size, int(self.symmetric)]),
        }
        if self.zero_point is not None:
            tensors[f"{prefix}zero_point"] = self.zero_point
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantizedWeight:
        bits, group_size, symmetric = tensors[f"{prefix}format"].tolist()
        return cls(
            codes=tensors[f"{prefix}codes"],
            scale=tensors[f"{prefix}scale"],
            zero_point=tensors.get(f"{prefix}zero_point"),
            bits=bits,
            group_size=group_size,
            symmetric=bool(symmetric),
        )


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The smallest and largest integer code."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def resolve_group_size(in_features: int, group_size: int, *, layer: str = "the weight") -> int:
    """`group_size`, or `in_features` for -1; a ValueError naming `layer` when groups would not
    tile the input width (the API refuses such recipes earlier, when it knows the shapes)."""
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the input width {in_features} of {layer}"
        )
    return group_size


def group_params(
    w_min: torch.Tensor, w_max: torch.Tensor, *, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point) for groups whose weights span [w_min, w_max] (any equal shapes).

    Symmetric: scale = max|w| / ((2^b - 1) / 2), so the codes -2^(b-1) … 2^(b-1)-1 all get used
    and no weight is further than scale / 2 from its code (the largest positive weight, at
    +(2^b - 1)/2 steps, rounds to the top code with exactly that error). Asymmetric: the range is
    widened to include 0, so that 0 (padding, dead inputs) is represented exactly. `scale` is
    rounded to `dtype` (the weight's) here, before any code is computed with it.
    """
    w_min, w_max = w_min.float(), w_max.float()
    low, high = code_range(bits, symmetric)
    if symmetric:
        scale = torch.maximum(w_min.abs(), w_max.abs()) / ((high - low) / 2)
    else:
        w_min, w_max = w_min.clamp(max=0), w_max.clamp(min=0)
        scale = (w_max - w_min) / (high - low)
    # An all-zero group has no range; any positive scale represents it (with code 0 / z).
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype)
    if symmetric:
        return scale, None
    zero_point = torch.round(-w_min / scale.float()).clamp(low, high).to(torch.uint8)
    return scale, zero_point


def quantize_with(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
) -> torch.Tensor:
    """Codes for weights `w` with the given scale / zero point (broadcast against `w`)."""
    low, high = code_range(bits, zero_point is None)
    q = torch.round(w.float() / scale.float())
    if zero_point is not None:
        q = q + zero_point.float()
    return q.clamp(low, high).to(torch.int8 if zero_point is None else torch.uint8)


def dequantize_with(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """(codes - zero_point) * scale in scale's dtype (broadcast). Integer codes times a scale are
    exact in float32, so rounding once to the scale's dtype is what a kernel in that dtype gives."""
    q = codes.float()
    if zero_point is not None:
        q = q - zero_point.float()
    return (q * scale.float()).to(scale.dtype)


RTN_ROWS = 1024


def quantize_groups(
    w: torch.Tensor, *, bits: int, group_size: int, symmetric: bool, layer: str = "the weight"
) -> QuantizedWeight:
    """Round-to-nearest quantization of w [out, in], each group's range from its min and max.
    Rows are independent: a large weight is done `RTN_ROWS` rows at a time (the same codes, and
    float32 temporaries of a slice, not of the whole matrix)."""
    out_features, in_features = w.shape
    group_size = resolve_group_size(in_features, group_size, layer=layer)
    if out_features > RTN_ROWS:
        parts = [
            quantize_groups(rows, bits=bits, group_size=group_size, symmetric=symmetric, layer=layer)
            for rows in w.split(RTN_ROWS)
        ]
        return QuantizedWeight(
            codes=torch.cat([part.codes for part in parts]),
            scale=torch.cat([part.scale for part in parts]),
            zero_point=None if symmetric else torch.cat([part.zero_point for part in parts]),
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
        )
    groups = w.detach().float().reshape(out_features, in_features // group_size, group_size)
    scale, zero_point = group_params(
        groups.amin(dim=2), groups.amax(dim=2), bits=bits, symmetric=symmetric, dtype=w.dtype
    )
    codes = quantize_with(
        groups,
        scale.unsqueeze(2),
        None if zero_point is None else zero_point.unsqueeze(2),
        bits=bits,
    )
    return QuantizedWeight(
        codes=codes.reshape(out_features, in_features),
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The weight [out, in] the codes stand for, in the scale's dtype."""
    out_features, in_features = q.codes.shape
    groups = q.codes.reshape(out_features, in_features // q.group_size, q.group_size)
    zero_point = None if q.zero_point is None else q.zero_point.unsqueeze(2)
    return dequantize_with(groups, q.scale.unsqueeze(2), zero_point).reshape(
        out_features, in_features
    )


def attach(linear: nn.Linear, q: QuantizedWeight) -> None:
    """Make `linear` a weight-only quantized layer: dequantized weight, exact integers attached.
    A lazy layer (`streaming.make_lazy`) keeps no dequantized weight: its forward computes it
    from the codes, so a block holds one layer's float32 weight at a time."""
    if getattr(linear, LAZY, False):
        linear.weight = nn.Parameter(
            torch.empty(linear.weight.shape, device="meta"), requires_grad=False
        )
        setattr(linear, ATTRIBUTE, q)
        return
    with torch.no_grad():
        linear.weight.copy_(dequantize(q))
    setattr(linear, ATTRIBUTE, q)


def relative_error_of(original: torch.Tensor, q: QuantizedWeight) -> float:
    """`relative_error(original, dequantize(q))`, a slice of rows at a time (no float32 copy of
    the whole weight)."""
    error = norm = 0.0
    for start in range(0, original.shape[0], RTN_ROWS):
        rows = slice(start, start + RTN_ROWS)
        part = QuantizedWeight(
            codes=q.codes[rows],
            scale=q.scale[rows],
            zero_point=None if q.zero_point is None else q.zero_point[rows],
            bits=q.bits,
            group_size=q.group_size,
            symmetric=q.symmetric,
        )
        w = original[rows].float()
        error += (w - dequantize(part).float()).double().square().sum().item()
        norm += w.double().square().sum().item()
    return (error / norm) ** 0.5 if norm else 0.0


def relative_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """||W - Ŵ||_F / ||W||_F."""
    norm = original.float().norm().item()
    return (original.float() - quantized.float()).norm().item() / norm if norm else 0.0
