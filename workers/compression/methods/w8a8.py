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

The layers become `W8A8Linear` (`runtime/int8.py`), both the in-memory layer and the runtime one
`export.load_artifact` builds, so the job measures what users run.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.calibration import (
    BlockInputs,
    block_layers,
    linear_inputs,
    outside_blocks,
)
from workers.compression.layer_selection import linear_layers
from workers.compression.quant import quantize_groups
from workers.compression.recipe import W8A8Config
from workers.compression.registry import StageContext, register_method
from workers.compression.runtime.int8 import W8A8Linear, activation_scale
from workers.compression.streaming import resident_layers


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
        for step, (name, linear) in enumerate(resident_layers(model, targeted), start=1):
            model.set_submodule(name, w8a8_linear(linear, None))
            context.report(step, len(targeted), f"quantized {name}", unit="layer")
        return summary

    outside = outside_blocks(model, targeted)
    if outside:
        raise ValueError(
            f"w8a8 with static activations calibrates layers inside the model's blocks only; "
            f"{', '.join(outside)} are outside them (use activations: dynamic, or `ignore` them)"
        )
    handler = StaticW8A8Handler(targeted)
    per_block = context.run_blockwise(model, handler, restore=handler.restore)
    input_max = {name: info["input_max"] for block in per_block for name, info in block.items()}
    largest = max(input_max, key=input_max.get)
    summary.update(
        calibration_samples=len(context.calibration),
        calibration_tokens=sum(ids.numel() for ids in context.calibration),
        largest_input={"layer": largest, "max": input_max[largest]},
    )
    return summary
