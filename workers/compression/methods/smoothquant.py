"""SmoothQuant: move activation outliers into the weights before INT8 quantization (Xiao, Lin,
Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", 2022).

LLM activations have a few channels whose values are 10-100x the rest, in every token; one int8
scale per tensor (or per token) then leaves the other channels a handful of levels. Weights have
no such outliers. SmoothQuant divides each input channel j of a Linear by

    s_j = max|X_j|^α / max|W_:,j|^(1-α)

and multiplies the weight's column j by s_j (`smoothing.apply_scales` folds 1/s into the layer
that produces X, so the model computes the same function). α = 0.5 splits the difficulty evenly
between activations and weights; larger α moves more of it into the weights.

The maxima come from the calibration data, one block at a time (`calibration.run_blockwise`). Which
producer/consumer pairs can be rescaled exactly depends on the architecture (`smoothing.py`); on
Llama-style models that includes up_proj → down_proj, whose inputs carry SmolLM2's largest
outliers. This stage quantizes nothing: a `w8a8` stage (or another quantizing stage) follows it.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.calibration import (
    BlockInputs,
    linear_inputs,
    model_blocks,
)
from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import SmoothQuantConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.smoothing import (
    Balance,
    apply_scales,
    block_balances,
    consumer_weight_max,
)

# Floors that keep a dead channel (all-zero inputs or weights) from giving a zero or infinite
# scale; such a channel gets s = 1 (left alone).
_EPS = 1e-5


def smoothing_scales(
    activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float
) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_:,j|^(1-α) (float32), 1 where a channel is dead."""
    activation_max, weight_max = activation_max.float(), weight_max.float()
    scales = activation_max.clamp(min=_EPS).pow(alpha) / weight_max.clamp(min=_EPS).pow(1 - alpha)
    dead = (activation_max <= 0) | (weight_max <= 0)
    return torch.where(dead, torch.ones_like(scales), scales.clamp(min=_EPS))


def input_channel_max(
    block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs
) -> dict[str, torch.Tensor]:
    """max |x_j| over every calibration token, per input channel of each named layer; `inputs`
    is left holding the block's outputs."""
    maxima: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        current = x.detach().abs().amax(dim=0).float()
        maxima[name] = current if name not in maxima else torch.maximum(maxima[name], current)

    with linear_inputs(block, layers, observe):
        # The outputs are the next block's inputs: the rescaling that follows leaves them as they
        # are (up to float rounding), so this one pass both observes and advances.
        inputs.advance(block)
    return maxima


class SmoothQuantBlockHandler:
    def __init__(self, config: SmoothQuantConfig, model_config, targeted: set[str]) -> None:
        self.config = config
        self.model_config = model_config
        self.targeted = targeted

    def balances(self, block_name: str, block: nn.Module) -> list[Balance]:
        return [
            balance
            for balance in block_balances(block, self.model_config)
            if any(f"{block_name}.{name}" in self.targeted for name in balance.consumers)
        ]

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        balances = self.balances(block_name, block)
        if not balances:
            inputs.advance(block)
            return {}
        # The consumers of one balance share their input: observing the first is enough.
        observed = {
            balance.consumers[0]: block.get_submodule(balance.consumers[0]) for balance in balances
        }
        maxima = input_channel_max(block, observed, inputs)
        summary = {}
        for balance in balances:
            activation_max = balance.producer_channels(maxima[balance.consumers[0]])
            weight_max = balance.producer_channels(consumer_weight_max(block, balance))
            scales = smoothing_scales(activation_max, weight_max, self.config.alpha)
            apply_scales(block, balance, scales)
            summary[f"{block_name}.{balance.producer}"] = {
                "consumers": [f"{block_name}.{name}" for name in balance.consumers],
                "activation_max": round(activation_max.max().item(), 4),
                "scale_max": round(scales.max().item(), 4),
                "scale_min": round(scales.min().item(), 6),
            }
        return summary


@register_method(SmoothQuantConfig)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, context: StageContext) -> dict:
    targeted, _ = linear_layers(model, config)
    handler = SmoothQuantBlockHandler(config, model.config, set(targeted))
    blocks_name, blocks = model_blocks(model)
    if not any(handler.balances(f"{blocks_name}.{i}", block) for i, block in enumerate(blocks)):
        raise ValueError(
            f"smoothquant knows no exact rescaling for {type(model).__name__}'s blocks among the "
            "targeted layers (supported: Llama-style decoders, BERT-style encoders)"
        )
    per_block = context.run_blockwise(model, handler, handler_advances=True)
    smoothed = {name: info for block in per_block for name, info in block.items()}
    return {
        "alpha": config.alpha,
        "smoothed": len(smoothed),
        "largest_activation": max(info["activation_max"] for info in smoothed.values()),
        "calibration_samples": len(context.calibration),
        "calibration_tokens": sum(ids.numel() for ids in context.calibration),
        "balances": smoothed,
    }
