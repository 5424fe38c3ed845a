"""GPTQ: weight-only quantization that corrects each rounding error with the weights not yet
quantized (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", 2022).

For a layer with weights W [out, in] and calibration inputs X [tokens, in], GPTQ minimises the
output error ||W X^T - Ŵ X^T||² one input column at a time. With H = 2 X^T X, quantizing column j
to q_j and moving the remaining columns by

    δW[:, j+1:] = -(w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_j,j+1:

is the optimal correction (Optimal Brain Quantization), where H⁻¹ is the inverse Hessian restricted
to the columns not yet quantized. The paper's three tricks make that exact and fast:
- a fixed column order for all rows, so the restricted inverses are the rows of the upper Cholesky
  factor U of H⁻¹ (U[j, j:] / U[j, j] replaces the sequence of inverse updates);
- lazy batches: the updates from a block of `block_size` columns reach the columns after the block
  in one matrix multiply (the loop inside a block touches only the block);
- dampening: λ = damping · mean(diag H) is added to the diagonal, so H stays invertible when inputs
  are correlated or the calibration set is small.
Options: `act_order` quantizes the columns with the largest inputs (diag H) first, while the most
other columns remain to absorb their errors. On SmolLM2 (4-bit, groups of 64) it is what makes GPTQ
pay: perplexity 39.8 with RTN, 39.2 with GPTQ in column order, 34.6 with act_order (FP32 28.8),
the gain coming from v_proj/o_proj. Groups stay contiguous in the original column order
(what the export formats store); a group's scale is fixed when its first column comes up, from the
group's current, error-updated weights.

Layers are calibrated block by block (`calibration.run_blockwise`): the inputs of all the targeted
layers of a block are collected in one pass of the block, before any of them changes (as in the
paper's reference code), then each layer is quantized.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workers.compression.calibration import (
    BlockInputs,
    block_layers,
    input_hessians,
    outside_blocks,
)
from workers.compression.methods.rtn import weight_only_targets
from workers.compression.quant import (
    QuantizedWeight,
    attach,
    code_range,
    group_params,
    relative_error,
    resolve_group_size,
)
from workers.compression.recipe import GptqConfig
from workers.compression.registry import StageContext, register_method


@contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """GPTQ's column loop is thousands of small operations. Splitting each over CPU threads costs
    more in synchronisation than it saves, and far more when another process shares the cores
    (measured on 2 cores: 0.24 s for a 1536 x 576 layer on one thread, 5 s on two)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_factor(
    hessian: torch.Tensor,
    damping: float,
    *,
    order: torch.Tensor | None = None,
    method: str,
    layer: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead) for H = `hessian` with its inputs taken in `order` (default: as they are):
    U [in, in] float32 is the upper Cholesky factor of the dampened H⁻¹ (row j of U holds the
    inverse restricted to columns j:, see the module docstring), `dead` marks (in that order) the
    inputs that were always zero, given a unit diagonal so that H stays invertible. `hessian` is
    not changed. Shared with SparseGPT.

    With J the order reversal and K = J H J = M Mᵀ (M lower), U = J M⁻¹ J: one Cholesky and one
    triangular inverse in float32, on all the process's threads — a third of the work of inverting
    H and factoring the inverse again, and at most two [in, in] matrices at once besides `hessian`
    (on a 7B model's 11008-wide down projection, 485 MB each).
    """
    size = hessian.shape[0]
    order = torch.arange(size, device=hessian.device) if order is None else order
    reverse = order.flip(0)
    K = hessian.detach()[reverse[:, None], reverse].float()  # a copy: `hessian` stays as it is
    dead = K.diagonal() == 0
    K.diagonal()[dead] = 1
    K.diagonal().add_(damping * K.diagonal().mean())
    M, info = torch.linalg.cholesky_ex(K)
    del K
    if info.item():
        raise ValueError(
            f"{method}: the Hessian of {layer} is not positive definite; raise `damping`"
        )
    inverse = torch.eye(size, dtype=torch.float32, device=M.device)
    torch.linalg.solve_triangular(M, inverse, upper=False, out=inverse)  # M⁻¹, in place
    del M
    return inverse.flip((0, 1)), dead.flip(0)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool,
    damping: float,
    block_size: int,
    layer: str = "the weight",
) -> QuantizedWeight:
    """GPTQ of one weight matrix [out, in] given H = 2 XᵀX [in, in] of its calibration inputs."""
    out_features, in_features = weight.shape
    group_size = resolve_group_size(in_features, group_size, layer=layer)
    perm = (
        torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        if act_order
        else torch.arange(in_features, device=weight.device)
    )
    position = torch.argsort(perm)  # where each original column sits in the processing order
    U, dead = inverse_hessian_factor(hessian, damping, order=perm, method="GPTQ", layer=layer)
    W = weight.detach().float()[:, perm]  # a copy, in processing order
    # An input that is always zero carries no information: its weights are fixed at 0.
    W[:, dead] = 0

    num_groups = in_features // group_size
    group_of = (perm // group_size).tolist()  # the (original-order) group of each processed column
    scale = torch.empty(out_features, num_groups, dtype=weight.dtype, device=W.device)
    zero_point = None if symmetric else torch.empty_like(scale, dtype=torch.uint8)
    # The loop below runs once per input column, so it works on float copies of a group's scale
    # and zero point, and keeps the codes as floats until the end.
    group_scale: dict[int, torch.Tensor] = {}
    group_zero: dict[int, torch.Tensor] = {}
    low, high = code_range(bits, symmetric)
    codes = torch.empty_like(W)
    diagonal = torch.diagonal(U).tolist()
    # The column loop is thousands of small operations: one thread (the factorization above
    # used them all).
    with single_cpu_thread(W.device):
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1 = W[:, i1:i2]  # a view: the updates inside the block land in W directly
            U1 = U[i1:i2, i1:i2]
            errors = torch.zeros_like(W1)
            for i in range(i2 - i1):
                g = group_of[i1 + i]
                if g not in group_scale:
                    # None of the group's columns is quantized yet. Those inside this block are up to
                    # date; those after it still lack this block's pending (lazy) updates.
                    columns = position[g * group_size : (g + 1) * group_size]
                    current = W[:, columns] - errors[:, :i] @ U[i1 : i1 + i, columns]
                    inside = columns < i2
                    current[:, inside] = W[:, columns[inside]]
                    scale[:, g], z = group_params(
                        current.amin(dim=1),
                        current.amax(dim=1),
                        bits=bits,
                        symmetric=symmetric,
                        dtype=weight.dtype,
                    )
                    group_scale[g] = scale[:, g].float()
                    if z is not None:
                        zero_point[:, g] = z
                        group_zero[g] = z.float()
                s, z = group_scale[g], group_zero.get(g)
                w = W1[:, i]
                # quant.quantize_with and dequantize_with, with the same arithmetic on float codes.
                q = torch.round(w / s)
                if z is not None:
                    q.add_(z)
                q.clamp_(low, high)
                codes[:, i1 + i] = q
                w_hat = (q if z is None else q - z) * s
                if weight.dtype != torch.float32:
                    w_hat = w_hat.to(weight.dtype).float()
                error = (w - w_hat).div_(diagonal[i1 + i])
                W1[:, i + 1 :].addr_(error, U1[i, i + 1 :], alpha=-1)
                errors[:, i] = error
            W[:, i2:].sub_(errors @ U[i1:i2, i2:])

    return QuantizedWeight(
        codes=codes[:, position].to(torch.int8 if symmetric else torch.uint8),
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def relative_output_error(
    original: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor
) -> float:
    """||(W - Ŵ) Xᵀ|| / ||W Xᵀ|| on the calibration inputs, from H = 2 XᵀX (any scale):
    √(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))."""
    original, delta = original.float(), original.float() - quantized.float()
    signal = ((original @ H) * original).sum().item()
    return math.sqrt(max(((delta @ H) * delta).sum().item(), 0.0) / signal) if signal else 0.0


class GptqBlockHandler:
    """Quantizes the targeted layers of one block at a time (a `calibration.Handler`)."""

    def __init__(self, config: GptqConfig, targeted: list[str]) -> None:
        self.config = config
        self.targeted = targeted

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        prefix = block_name + "."
        layers = block_layers(block_name, block, self.targeted)
        if not layers:
            return {}
        hessians = input_hessians(block, layers, inputs)

        config, summary = self.config, {}
        for name, layer in layers.items():
            H = hessians.pop(name)
            original = layer.weight.detach().clone()
            quantized = gptq_quantize(
                original,
                H,
                bits=config.bits,
                group_size=config.group_size,
                symmetric=config.symmetric,
                act_order=config.act_order,
                damping=config.damping,
                block_size=config.block_size,
                layer=prefix + name,
            )
            attach(layer, quantized)
            summary[prefix + name] = {
                "relative_weight_error": relative_error(original, layer.weight),
                "relative_output_error": relative_output_error(original, layer.weight, H),
            }
        return summary


@register_method(GptqConfig)
def gptq(model: nn.Module, config: GptqConfig, context: StageContext) -> dict:
    targeted, skipped = weight_only_targets(model, config)
    outside = outside_blocks(model, targeted)
    if outside:
        # GPTQ sees layer inputs block by block only; `modules` can select others (lm_head).
        raise ValueError(
            f"gptq quantizes layers inside the model's blocks only; {', '.join(outside)} are "
            "outside them (quantize them in an `rtn` stage, or `ignore` them)"
        )
    handler = GptqBlockHandler(config, targeted)
    per_block = context.run_blockwise(model, handler)
    layers = {name: errors for block in per_block for name, errors in block.items()}
    return {
        "quantized_layers": len(layers),
        "quantized": targeted,
        "skipped": skipped,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "calibration_samples": len(context.calibration),
        "calibration_tokens": sum(ids.numel() for ids in context.calibration),
        "mean_relative_weight_error": _mean(e["relative_weight_error"] for e in layers.values()),
        "mean_relative_output_error": _mean(e["relative_output_error"] for e in layers.values()),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
