"""W8A8: INT8 weights and INT8 activations, so the matrix multiplies themselves run in integers.

Weights: symmetric, one scale per output channel, w ≈ q_w · s_w (round to nearest, `quant.py`).
Activations: symmetric int8, x ≈ q_x · s_x, with
- `static`: one scale per layer input, s_x = max|x| / 127.5 over the calibration data (the
  compressed-tensors "minmax" observer), fixed in the artifact;
- `dynamic`: one scale per token, computed from the token's own maximum at run time.
Then y = (q_x q_wᵀ) · s_x s_wᵀ + b with an int8 x int8 → int32 product.

Static scales are calibrated layer by layer (`calibration.run_blockwise`): a block's layers are
observed on what the already-quantized blocks before it produce. Outlier channels make one scale
per tensor coarse for every other channel; a `smoothquant` stage first flattens them.

`W8A8Linear` is both the in-memory layer and the runtime one `export.load_artifact` builds, so the
job measures what users run. On x86 CPUs with VNNI, static layers use fbgemm's int8 kernel with a
float output (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`); otherwise, and for
per-token scales, `torch._int_mm`. Both compute the integer product exactly, so they agree with
each other and with compressed-tensors' reference up to float rounding of the rescale.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.calibration import (
    BlockInputs,
    block_layers,
    linear_inputs,
    outside_blocks,
    run_blockwise,
)
from workers.compression.layer_selection import linear_layers
from workers.compression.methods.dynamic_int8 import FULL_RANGE_ACTIVATIONS
from workers.compression.quant import quantize_groups
from workers.compression.recipe import W8A8Config
from workers.compression.registry import StageContext, register_method

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
        # Symmetric int8 codes [-128, 127] are fbgemm's uint8 codes with zero point 128.
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self.input_scale.item(), 128, self._packed
        )

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: pack again from the buffers
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        activations = "dynamic per token" if self.dynamic else "static per tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={activations}"


def w8a8_linear(linear: nn.Linear, input_scale: torch.Tensor | None) -> W8A8Linear:
    """`linear` with its weights quantized to int8 per output channel."""
    quantized = quantize_groups(linear.weight.detach(), bits=8, group_size=-1, symmetric=True)
    return W8A8Linear(quantized.codes, quantized.scale, input_scale, linear.bias)


def empty_w8a8(linear: nn.Linear, *, static: bool) -> W8A8Linear:
    """A placeholder of `linear`'s shape whose buffers a saved state then fills (resume, load)."""
    return W8A8Linear(
        torch.zeros(linear.out_features, linear.in_features, dtype=torch.int8),
        torch.ones(linear.out_features, 1),
        torch.ones(1) if static else None,
        None if linear.bias is None else torch.zeros(linear.out_features),
    ).to(linear.weight.device)


class StaticW8A8Handler:
    """Observes each targeted layer's input maximum in one block, then replaces the layers."""

    def __init__(self, targeted: list[str]) -> None:
        self.targeted = targeted

    def layers(self, block_name: str, block: nn.Module) -> dict[str, nn.Module]:
        return block_layers(block_name, block, self.targeted)

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        layers = self.layers(block_name, block)
        if not layers:
            return {}
        maxima: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            current = x.detach().abs().amax().float()
            maxima[name] = torch.maximum(maxima[name], current) if name in maxima else current

        with linear_inputs(block, layers, observe):
            inputs.run(block)
        summary = {}
        for name, layer in layers.items():
            scale = activation_scale(maxima[name]).reshape(1)
            block.set_submodule(name, w8a8_linear(layer, scale))
            summary[f"{block_name}.{name}"] = {"input_max": round(maxima[name].item(), 4)}
        return summary

    def restore(self, index: int, block: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Resume: rebuild the layers the saved block state holds as W8A8, then load it."""
        saved_as_w8a8 = {
            name: module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and f"{name}.input_scale" in state
        }
        for name, layer in saved_as_w8a8.items():
            block.set_submodule(name, empty_w8a8(layer, static=True))
        block.load_state_dict(state, strict=True)


@register_method(W8A8Config)
def w8a8(model: nn.Module, config: W8A8Config, context: StageContext) -> dict:
    targeted, skipped = linear_layers(model, config)
    if not targeted:
        raise ValueError("w8a8 matched no Linear layer; check `modules` and `ignore`")
    summary = {
        "activations": config.activations,
        "quantized_layers": len(targeted),
        "quantized": targeted,
        "skipped": skipped,
    }
    if config.activations == "dynamic":
        for step, name in enumerate(targeted, start=1):
            model.set_submodule(name, w8a8_linear(model.get_submodule(name), None))
            context.report(step, len(targeted), f"quantized {name}")
        return summary

    if not context.calibration:
        raise ValueError("w8a8 with static activations needs calibration data")
    outside = outside_blocks(model, targeted)
    if outside:
        raise ValueError(
            f"w8a8 with static activations calibrates layers inside the model's blocks only; "
            f"{', '.join(outside)} are outside them (use activations: dynamic, or `ignore` them)"
        )
    handler = StaticW8A8Handler(targeted)
    per_block = run_blockwise(
        model,
        context.calibration,
        handler,
        progress=context.report,
        checkpoint=context.checkpoint,
        restore=handler.restore,
    )
    input_max = {name: info["input_max"] for block in per_block for name, info in block.items()}
    largest = max(input_max, key=input_max.get)
    summary.update(
        calibration_samples=len(context.calibration),
        calibration_tokens=sum(ids.numel() for ids in context.calibration),
        largest_input={"layer": largest, "max": input_max[largest]},
    )
    return summary
