"""SparseGPT: prune one input column at a time and let the weights not yet visited compensate
(Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
2023).

For a layer with weights W [out, in] and calibration inputs X [tokens, in], SparseGPT minimises the
output error ||W Xᵀ - Ŵ Xᵀ||² under a sparsity mask, column by column, as GPTQ does for rounding
(the two papers share the machinery; `gptq.py` explains it). With H = 2 XᵀX and U the upper
Cholesky factor of H⁻¹, removing the weights of column j that the mask drops (w_j → q_j, zero
where pruned, unchanged elsewhere) and moving the columns after j by

    δW[:, j+1:] = -(w_j - q_j) / U_jj · U[j, j+1:]

is the Optimal Brain Surgeon update restricted to the columns not yet visited. Which weights to
drop is chosen as the columns come, from their current, already-updated values, by the OBS
saliency w² / [U_jj]² (the output error that removing w alone costs):
- unstructured: "adaptive mask selection": at the start of every lazy block of `block_size`
  columns, the block's weights of all rows compete together and the `sparsity` share of lowest
  saliency goes. Columns (and rows) then end up with different sparsities, following where the
  error is cheapest; each block, and so the layer, has the target sparsity.
- 2:4: at every fourth column, the 2 of the next 4 weights of each row with the lowest saliency go.
The updates from a block reach the columns after it in one matrix multiply (lazy batching), and
λ = damping · mean(diag H) keeps H invertible (both as in GPTQ, whose helper computes U).

Layers are pruned block by block (`calibration.run_blockwise`): the inputs of all the targeted
layers of a block are collected in one pass before any of them changes, as in the paper's code;
the next block is calibrated on this block's pruned outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.calibration import BlockInputs, block_layers, input_hessians
from workers.compression.methods.gptq import (
    HessianFactor,
    factored_layers,
    inverse_hessian_factor,
    single_cpu_thread,
)
from workers.compression.methods.magnitude import pruning_summary, sparsity_targets
from workers.compression.recipe import SparseGptConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.sparsity import keep_largest, prune_, two_of_four
from workers.compression.streaming import checkpoint_dtype_of, in_precision, set_weight


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    *,
    sparsity: float,
    pattern: str,
    damping: float,
    block_size: int,
    layer: str = "the weight",
    errors: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of one weight matrix [out, in] given H = 2 XᵀX [in, in] of its calibration
    inputs (or its factor, `inverse_hessian_factor` with this `damping`): (the pruned and updated
    weight in the weight's dtype, the keep mask). Given a dict, `errors["output"]` receives
    tr(ΔW H ΔWᵀ) without H, as `gptq.gptq_quantize` computes it."""
    out_features, in_features = weight.shape
    if pattern == "2:4":
        if in_features % 4:
            raise ValueError(
                f"2:4 sparsity needs a width divisible by 4; {layer} has {in_features}"
            )
        # A group of 4 must not straddle two lazy blocks. The block size changes no result
        # (beyond rounding) when masks are chosen per group, so it is rounded up to a multiple of 4.
        block_size = -(-block_size // 4) * 4
    elif pattern != "unstructured":
        raise ValueError(f"unknown sparsity pattern {pattern!r}")
    factor = (
        hessian
        if isinstance(hessian, HessianFactor)
        else inverse_hessian_factor(hessian, damping, method="SparseGPT", layer=layer)
    )
    U, dead = factor.U, factor.dead
    W = weight.detach().float().clone()
    # An input that is always zero carries no information: its weights go to 0 (and are the first
    # to be pruned).
    W[:, dead] = 0
    diagonal = torch.diagonal(U)
    keep = torch.ones_like(W, dtype=torch.bool)
    damped = 0.0  # Σ error²: tr(ΔW (H + λI) ΔWᵀ)
    # One thread for the column loop's thousands of small operations (see gptq).
    with single_cpu_thread(W.device):
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1, U1, keep1 = W[:, i1:i2], U[i1:i2, i1:i2], keep[:, i1:i2]  # views into W, U, keep
            d1 = diagonal[i1:i2]
            pending = torch.zeros_like(W1)
            if pattern == "unstructured":
                saliency = (W1 / d1).square()
                keep1.copy_(keep_largest(saliency.reshape(1, -1), sparsity).reshape(saliency.shape))
            for i in range(i2 - i1):
                if pattern == "2:4" and i % 4 == 0:
                    keep1[:, i : i + 4] = two_of_four((W1[:, i : i + 4] / d1[i : i + 4]).square())
                # w_j - q_j: the removed weights, zero where the column keeps its weight.
                removed = W1[:, i].masked_fill(keep1[:, i], 0)
                error = removed.div_(d1[i])
                W1[:, i + 1 :].addr_(error, U1[i, i + 1 :], alpha=-1)
                # Set to exact zeros, not w - error · U_jj, which only rounds to about zero.
                W1[:, i].masked_fill_(~keep1[:, i], 0)
                pending[:, i] = error
            W[:, i2:].sub_(pending @ U[i1:i2, i2:])
            damped += pending.double().square().sum().item()
    if errors is not None:
        # ‖ΔW‖² a slice of rows at a time (float64 copies of a whole 7B MLP weight: 720 MB).
        squares = sum(
            rows.float().masked_fill(dead, 0).sub_(pruned).double().square().sum().item()
            for rows, pruned in zip(
                weight.detach().split(_DELTA_ROWS), W.split(_DELTA_ROWS), strict=True
            )
        )
        errors["output"] = max(damped - factor.damping * squares, 0)
    return W.to(weight.dtype), keep


_DELTA_ROWS = 1024


class SparseGptBlockHandler:
    """Prunes the targeted layers of one block at a time (a `calibration.Handler`); a streamed
    block comes lazily (see `GptqBlockHandler`)."""

    lazy_block = True

    def __init__(
        self, config: SparseGptConfig, targeted: list[str], dtype: torch.dtype = torch.float32
    ) -> None:
        self.config = config
        self.targeted = targeted
        self.dtype = dtype  # the checkpoint's: the updated weights are rounded to it

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        prefix = block_name + "."
        layers = block_layers(block_name, block, self.targeted)
        if not layers:
            return {}
        hessians = input_hessians(block, layers, inputs)

        config, summary = self.config, {}
        for name, original, factor in factored_layers(
            layers, hessians, config.damping, act_order=False, method="SparseGPT", prefix=prefix
        ):
            errors: dict = {}
            pruned, keep = sparsegpt_prune(
                original.weight,
                factor,
                sparsity=config.sparsity,
                pattern=config.pattern,
                damping=config.damping,
                block_size=config.block_size,
                layer=prefix + name,
                errors=errors,
            )
            layer = layers[name]
            set_weight(layer, in_precision(pruned, self.dtype))
            prune_(layer, keep, pattern=config.pattern)  # already zero there; marks the layer
            summary[prefix + name] = {
                "relative_output_error": original.relative_output_error(errors["output"])
            }
        return summary


@register_method(SparseGptConfig)
def sparsegpt(model: nn.Module, config: SparseGptConfig, context: StageContext) -> dict:
    targeted, skipped = sparsity_targets(model, config, blockwise=True)
    handler = SparseGptBlockHandler(config, targeted, checkpoint_dtype_of(model))
    per_block = context.run_blockwise(model, handler)
    errors = [layer["relative_output_error"] for block in per_block for layer in block.values()]
    return {
        **pruning_summary(model, config, targeted, skipped),
        "calibration_samples": len(context.calibration),
        "calibration_tokens": sum(ids.numel() for ids in context.calibration),
        "mean_relative_output_error": sum(errors) / len(errors),
    }
