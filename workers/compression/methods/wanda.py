"""Wanda: prune by weights and activations (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning
Approach for Large Language Models", 2023).

For a layer with weights W [out, in] and calibration inputs X [tokens, in], the score of weight W_ij
is

    S_ij = |W_ij| · ||X_j||₂

the size of the weight times the norm of the input feature it multiplies over all calibration
tokens. LLMs have a few input features with activations far larger than the rest; a small weight
on such a feature matters more than its magnitude says, which is where magnitude pruning fails.
Scores are compared within each output row (unstructured), or within each group of 4 inputs
(2:4); there are no weight updates. The norms come from one pass of each block over the
calibration data (`calibration.run_blockwise`), so each block is pruned on the inputs that the
already pruned blocks before it produce.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.calibration import BlockInputs, block_layers, linear_inputs
from workers.compression.methods.magnitude import pruning_summary, sparsity_targets
from workers.compression.recipe import WandaConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.sparsity import mask_for, prune_


def input_norms(
    block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs
) -> dict[str, torch.Tensor]:
    """||X_j||₂ [in] (float32) of each named layer's calibration inputs, from one run of `block`.
    Only the sums of squares are kept: a layer's inputs never need to be held at once."""
    squares = {
        name: torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)
        for name, layer in layers.items()
    }

    def accumulate(name: str, x: torch.Tensor) -> None:
        squares[name].add_(x.float().square().sum(dim=0))

    with linear_inputs(block, layers, accumulate):
        inputs.run(block)
    return {name: total.sqrt() for name, total in squares.items()}


def wanda_mask(
    weight: torch.Tensor, norms: torch.Tensor, *, sparsity: float, pattern: str
) -> torch.Tensor:
    """The mask [out, in] keeping the weights of largest |W_ij| · ||X_j||."""
    scores = weight.detach().float().abs() * norms.unsqueeze(0)
    return mask_for(scores, sparsity=sparsity, pattern=pattern)


class WandaBlockHandler:
    """Prunes the targeted layers of one block at a time (a `calibration.Handler`)."""

    def __init__(self, config: WandaConfig, targeted: list[str]) -> None:
        self.config = config
        self.targeted = targeted

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        layers = block_layers(block_name, block, self.targeted)
        if not layers:
            return {}
        # As in the paper's code, every layer's inputs are measured before any layer of the
        # block is pruned; the next block then sees this block's pruned outputs.
        norms = input_norms(block, layers, inputs)
        for name, layer in layers.items():
            mask = wanda_mask(
                layer.weight,
                norms[name],
                sparsity=self.config.sparsity,
                pattern=self.config.pattern,
            )
            prune_(layer, mask, pattern=self.config.pattern)
        return {}


@register_method(WandaConfig)
def wanda(model: nn.Module, config: WandaConfig, context: StageContext) -> dict:
    targeted, skipped = sparsity_targets(model, config, blockwise=True)
    context.run_blockwise(model, WandaBlockHandler(config, targeted))
    return {
        **pruning_summary(model, config, targeted, skipped),
        "calibration_samples": len(context.calibration),
        "calibration_tokens": sum(ids.numel() for ids in context.calibration),
    }
