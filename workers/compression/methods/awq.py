"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", 2023).

A few input channels carry much larger activations than the rest, and the weights that meet them
matter most. Rounding error is relative to a group's range, so AWQ multiplies those columns by a
factor s_j > 1 before rounding (their relative error shrinks) and divides the activations by s_j
(folded into the producing layer, `smoothing.apply_scales`, so nothing changes before rounding):

    Q(W diag(s)) diag(s)⁻¹ X   instead of   Q(W) X

with s = mean|X|^α normalised by sqrt(max(s) · min(s)), and α chosen per producer/consumers pair
from `grid` points in [0, 1) (α = 0 is plain round-to-nearest) by the consumers' output error on
the calibration data. Then, as in the paper, each (row, group)'s range is clipped to the fraction
r ∈ {1, 0.95, …, 0.55} of its extremes that minimises that group's output error (not for q/k
projections, whose errors the attention product amplifies).

The output error of a change D to a weight is ||X Dᵀ||² = tr(D XᵀX Dᵀ): with the calibration
inputs' Gram matrix H = 2XᵀX/n (`calibration.input_hessians`, shared by layers with one input),
every candidate is scored on all calibration tokens for the price of [out, in] x [in, in]. This
scores each Linear on its own output, where the paper scores a whole attention or MLP module: a
simplification that keeps the search cheap on a CPU.

Layers are calibrated block by block (`calibration.run_blockwise`); the result is weight-only
integers exactly like `rtn`/`gptq` (`quant.attach`), exported as `pack-quantized`.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.calibration import (
    BlockInputs,
    block_layers,
    input_hessians,
    outside_blocks,
)
from workers.compression.methods.gptq import single_cpu_thread
from workers.compression.methods.rtn import weight_only_targets
from workers.compression.quant import attach, dequantize, quantize_groups, relative_error
from workers.compression.recipe import AwqConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.smoothing import Balance, apply_scales, block_balances

# The paper's clipping grid: shrink each group's range by up to half, in steps of 1/20.
CLIP_RATIOS = tuple(1 - step / 20 for step in range(10))
# Layers whose outputs are multiplied with each other (attention scores): clipping them is left out.
_NO_CLIP = ("q_proj", "k_proj", "query", "key")


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(D H Dᵀ) = Σ_rows d H dᵀ: the squared output change on the calibration inputs."""
    return ((delta @ hessian) * delta).sum()


class AwqBlockHandler:
    def __init__(self, config: AwqConfig, model_config, targeted: list[str]) -> None:
        self.config = config
        self.model_config = model_config
        self.targeted = targeted

    def quantized(self, weight: torch.Tensor, *, layer: str) -> torch.Tensor:
        """The dequantized round-to-nearest weight at the stage's settings."""
        config = self.config
        return dequantize(
            quantize_groups(
                weight,
                bits=config.bits,
                group_size=config.group_size,
                symmetric=config.symmetric,
                layer=layer,
            )
        ).float()

    def search_scales(
        self,
        block: nn.Module,
        balance: Balance,
        abs_mean: torch.Tensor,
        hessian: torch.Tensor,
        block_name: str,
    ) -> tuple[torch.Tensor, float, float]:
        """(scales per producer channel, chosen α, error ratio vs α = 0) for one pair."""
        weights = {
            name: block.get_submodule(name).weight.detach().float() for name in balance.consumers
        }
        saliency = balance.producer_channels(abs_mean.float())
        best = (None, 0.0, None)
        baseline = None
        for step in range(self.config.grid):
            alpha = step / self.config.grid
            scales = saliency.clamp(min=1e-4).pow(alpha)
            scales = scales / (scales.max() * scales.min()).sqrt()
            columns = balance.consumer_channels(scales).unsqueeze(0)
            error = sum(
                output_error(
                    self.quantized(weight * columns, layer=f"{block_name}.{name}") / columns
                    - weight,
                    hessian,
                ).item()
                for name, weight in weights.items()
            )
            if baseline is None:
                baseline = error
            if best[2] is None or error < best[2]:
                best = (scales, alpha, error)
        scales, alpha, error = best
        return scales, alpha, (error / baseline if baseline else 1.0)

    def clip_and_quantize(self, linear: nn.Linear, hessian: torch.Tensor, name: str) -> dict:
        """Round-to-nearest after choosing each (row, group)'s clipping ratio (paper: auto_clip)."""
        config = self.config
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        group_size = in_features if config.group_size == -1 else config.group_size
        groups = in_features // group_size
        grouped = weight.reshape(out_features, groups, group_size)
        low, high = grouped.amin(dim=2, keepdim=True), grouped.amax(dim=2, keepdim=True)
        if config.symmetric:
            high = torch.maximum(low.abs(), high)
            low = -high
        ratios = CLIP_RATIOS if not name.endswith(_NO_CLIP) else (1.0,)
        # The diagonal blocks of H: a group's own share of the output error.
        blocks = torch.stack(
            [
                hessian[
                    g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size
                ]
                for g in range(groups)
            ]
        )
        best_error = torch.full((out_features, groups), float("inf"), device=weight.device)
        best_ratio = torch.ones(out_features, groups, 1, device=weight.device)
        for ratio in ratios:
            clipped = torch.clamp(grouped, low * ratio, high * ratio).reshape_as(weight)
            delta = (self.quantized(clipped, layer=name) - weight).reshape(
                out_features, groups, group_size
            )
            error = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio[better] = ratio
        clipped = torch.clamp(grouped, low * best_ratio, high * best_ratio).reshape_as(weight)
        original = linear.weight.detach().clone()
        attach(
            linear,
            quantize_groups(
                clipped.to(linear.weight.dtype),
                bits=config.bits,
                group_size=config.group_size,
                symmetric=config.symmetric,
                layer=name,
            ),
        )
        delta = linear.weight.detach().float() - original.float()
        signal = output_error(original.float(), hessian).item()
        return {
            "relative_weight_error": relative_error(original, linear.weight),
            "relative_output_error": (output_error(delta, hessian).item() / signal) ** 0.5
            if signal
            else 0.0,
            "mean_clip_ratio": round(best_ratio.mean().item(), 4),
        }

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        layers = block_layers(block_name, block, self.targeted)
        if not layers:
            return {}
        balances = [
            balance
            for balance in block_balances(block, self.model_config)
            if any(name in layers for name in balance.consumers)
        ]
        # Statistics of every layer the balances rescale or the stage quantizes, before changes.
        observed = dict(layers)
        for balance in balances:
            observed.update({name: block.get_submodule(name) for name in balance.consumers})
        abs_means: dict[str, torch.Tensor] = {}
        hessians = input_hessians(block, observed, inputs, abs_means=abs_means)

        with single_cpu_thread(inputs.hidden[0].device):
            return self._search_and_quantize(
                block_name, block, layers, balances, hessians, abs_means
            )

    def _search_and_quantize(
        self,
        block_name: str,
        block: nn.Module,
        layers: dict[str, nn.Linear],
        balances: list[Balance],
        hessians: dict[str, torch.Tensor],
        abs_means: dict[str, torch.Tensor],
    ) -> dict:
        prefix = block_name + "."
        scaled = {}
        for balance in balances:
            first = balance.consumers[0]
            scales, alpha, ratio = self.search_scales(
                block, balance, abs_means[first], hessians[first], block_name
            )
            apply_scales(block, balance, scales)
            # The consumers' inputs are now X / s: their Gram matrix follows.
            columns = balance.consumer_channels(scales.to(hessians[first].device))
            inverse = (1 / columns).unsqueeze(0)
            for name in balance.consumers:
                hessians[name] = hessians[name] * inverse * inverse.T
            scaled[prefix + balance.producer] = {
                "consumers": [prefix + name for name in balance.consumers],
                "alpha": alpha,
                "error_vs_rtn": round(ratio, 4),
            }
        summary = {"scaled": scaled, "layers": {}}
        for name, linear in layers.items():
            summary["layers"][prefix + name] = self.clip_and_quantize(
                linear, hessians[name], prefix + name
            )
        return summary


@register_method(AwqConfig)
def awq(model: nn.Module, config: AwqConfig, context: StageContext) -> dict:
    targeted, skipped = weight_only_targets(model, config)
    outside = outside_blocks(model, targeted)
    if outside:
        raise ValueError(
            f"awq quantizes layers inside the model's blocks only; {', '.join(outside)} are "
            "outside them (quantize them in an `rtn` stage, or `ignore` them)"
        )
    handler = AwqBlockHandler(config, model.config, targeted)
    per_block = context.run_blockwise(model, handler)
    layers = {name: info for block in per_block for name, info in block.get("layers", {}).items()}
    scaled = {name: info for block in per_block for name, info in block.get("scaled", {}).items()}
    return {
        "quantized_layers": len(layers),
        "quantized": targeted,
        "skipped": skipped,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "grid": config.grid,
        "calibration_samples": len(context.calibration),
        "calibration_tokens": sum(ids.numel() for ids in context.calibration),
        "scaled_pairs": len(scaled),
        "mean_alpha": sum(info["alpha"] for info in scaled.values()) / len(scaled)
        if scaled
        else 0.0,
        "mean_relative_output_error": sum(i["relative_output_error"] for i in layers.values())
        / len(layers),
        "scales": scaled,
        "layers": layers,  # per layer: the dashboard charts them
    }
