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
the gain coming from v_proj/o_proj. Column order is not losing to RTN because SmolLM2's weights
sit on its GGUF's 4-bit grid (RTN's weight error is 0.1083 on them and 0.1082 once moved off it),
nor for precision (a float64 factorization gives the same layers to 4 digits): per layer it is
below RTN, on held-out inputs too; end to end it beats RTN on SmolLM2 moved off the grid
(perplexity 44.8 vs 50.6, FP32 30.5; 16 x 512 calibration) and on MiniLM's float weights (cosine
0.966 vs 0.950; act_order 0.971). See bench/results/gptq_grid.md and gptq_layers.md.
Groups stay contiguous in the original column order
(what the export formats store); a group's scale is fixed when its first column comes up, from the
group's current, error-updated weights.

Layers are calibrated block by block (`calibration.run_blockwise`): the inputs of all the targeted
layers of a block are collected in one pass of the block, before any of them changes (as in the
paper's reference code), then each layer is quantized.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    resolve_group_size,
)
from workers.compression.recipe import GptqConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.streaming import working_weight


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


@dataclass
class HessianFactor:
    """What GPTQ and SparseGPT need of a layer's Hessian H: `U` [in, in] float32, the upper
    Cholesky factor of the dampened H⁻¹ with the inputs taken in `order` (row j of U holds the
    inverse restricted to columns j:, see the module docstring); `dead` marks (in that order) the
    inputs that were always zero, given a unit diagonal so that H stays invertible; `damping` is
    the λ added to the diagonal (what turns the dampened objective back into the plain one)."""

    U: torch.Tensor
    dead: torch.Tensor
    order: torch.Tensor
    damping: float


def inverse_hessian_factor(
    hessian: torch.Tensor,
    damping: float,
    *,
    act_order: bool = False,
    method: str,
    layer: str,
    consume: bool = False,
) -> HessianFactor:
    """The factor of H = `hessian`, its inputs in order of decreasing diag H with `act_order`.
    Shared with SparseGPT.

    With J the order reversal and K = J H J = M Mᵀ (M lower), U = J M⁻¹ J: one Cholesky and one
    triangular inverse in float32, on all the process's threads — a third of the work of inverting
    H and factoring the inverse again. K is reordered where it lies and factored where it lies
    (LAPACK works on its column-major view, which for a symmetric K is K itself), so the
    factorization needs one more [in, in] matrix: M⁻¹ (turned into U where it lies).
    `consume`: `hessian` (a contiguous float32 matrix) is that K and holds garbage afterwards;
    otherwise K is a copy. On a 7B model's 11008-wide down projection, consuming holds two
    485 MB matrices at once, not four. The factor is bit for bit the same either way.
    """
    size = hessian.shape[0]
    order = (
        torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        if act_order
        else torch.arange(size, device=hessian.device)
    )
    reverse = order.flip(0)
    if consume:
        if hessian.dtype != torch.float32 or not hessian.is_contiguous():
            raise ValueError("only a contiguous float32 Hessian can be consumed")
        K = hessian.detach()
        if act_order:
            _permute_symmetric(K, reverse)
        else:
            _reverse(K)  # J H J: the matrix's elements in reverse order
    else:
        K = hessian.detach()[reverse[:, None], reverse].float()  # a copy
    dead = K.diagonal() == 0
    K.diagonal()[dead] = 1
    shift = damping * K.diagonal().mean().item()
    K.diagonal().add_(shift)
    # Factored in place: the column-major view is what LAPACK factors without a copy.
    info = torch.empty((), dtype=torch.int32, device=K.device)
    M, info = torch.linalg.cholesky_ex(K.mT, out=(K.mT, info))
    if info.item():
        raise ValueError(
            f"{method}: the Hessian of {layer} is not positive definite; raise `damping`"
        )
    inverse = torch.eye(size, dtype=torch.float32, device=M.device)
    torch.linalg.solve_triangular(M, inverse, upper=False, out=inverse)  # M⁻¹, in place
    del M, K
    U = _reverse(inverse)  # J M⁻¹ J, in place
    return HessianFactor(U=U, dead=dead.flip(0), order=order, damping=shift)


_MOVE_ELEMENTS = 1 << 20  # elements moved at once by `_reverse` / `_permute_symmetric`


def _reverse(matrix: torch.Tensor) -> torch.Tensor:
    """J A J for a square contiguous A, in place: its elements in reverse storage order (element
    (i, j) is element n² - 1 - (i n + j) of the storage), swapped a slice at a time."""
    flat = matrix.view(-1)
    count = flat.numel()
    for first in range(0, count // 2, _MOVE_ELEMENTS):
        last = min(first + _MOVE_ELEMENTS, count // 2)
        head = flat[first:last].clone()
        flat[first:last] = flat[count - last : count - first].flip(0)
        flat[count - last : count - first] = head.flip(0)
    return matrix


def _permute_symmetric(matrix: torch.Tensor, permutation: torch.Tensor) -> None:
    """A ← A[permutation][:, permutation] in place, for a square contiguous A: the columns a slice
    of rows at a time, then the rows along the permutation's cycles (one row held aside)."""
    size = matrix.shape[0]
    for rows in matrix.split(max(1, _MOVE_ELEMENTS // max(1, size))):
        rows.copy_(rows[:, permutation])
    source = permutation.tolist()  # row i takes what row source[i] holds
    done = [False] * size
    for start in range(size):
        if done[start] or source[start] == start:
            continue
        held = matrix[start].clone()
        row = start
        while source[row] != start:
            matrix[row] = matrix[source[row]]
            done[row] = True
            row = source[row]
        matrix[row] = held
        done[row] = True


def quantize_with(
    config: GptqConfig,
    weight: torch.Tensor,
    factor: torch.Tensor | HessianFactor,
    *,
    layer: str,
    errors: dict | None = None,
) -> QuantizedWeight:
    """`gptq_quantize` with a recipe stage's settings."""
    return gptq_quantize(
        weight,
        factor,
        bits=config.bits,
        group_size=config.group_size,
        symmetric=config.symmetric,
        act_order=config.act_order,
        damping=config.damping,
        block_size=config.block_size,
        layer=layer,
        errors=errors,
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool,
    damping: float,
    block_size: int,
    layer: str = "the weight",
    errors: dict | None = None,
) -> QuantizedWeight:
    """GPTQ of one weight matrix [out, in] given H = 2 XᵀX [in, in] of its calibration inputs, or
    its factor (`inverse_hessian_factor`, with this `act_order` and `damping`).

    Given a dict, `errors["output"]` receives tr(ΔW H ΔWᵀ), ΔW = W - Ŵ, without H: the loop's
    Σ error² is tr(ΔW (H + λI) ΔWᵀ) exactly (each column's update is optimal for the columns
    left), so subtracting λ‖ΔW‖² leaves the plain objective (ΔW counted zero at dead inputs,
    where H is zero anyway)."""
    out_features, in_features = weight.shape
    group_size = resolve_group_size(in_features, group_size, layer=layer)
    factor = (
        hessian
        if isinstance(hessian, HessianFactor)
        else inverse_hessian_factor(
            hessian, damping, act_order=act_order, method="GPTQ", layer=layer
        )
    )
    U, perm = factor.U, factor.order
    position = torch.argsort(perm)  # where each original column sits in the processing order
    W = weight.detach().float()[:, perm]  # a copy, in processing order
    # An input that is always zero carries no information: its weights are fixed at 0.
    dead_weights = W[:, factor.dead].double().square().sum().item() if errors is not None else 0
    W[:, factor.dead] = 0
    # For `errors`: Σ error² and ‖ΔW‖² (ΔW zero at dead inputs), accumulated column by column.
    damped = delta = 0.0
    columns_of = perm.tolist()
    alive = (~factor.dead).tolist()

    num_groups = in_features // group_size
    group_of = (perm // group_size).tolist()  # the (original-order) group of each processed column
    scale = torch.empty(out_features, num_groups, dtype=weight.dtype, device=W.device)
    zero_point = None if symmetric else torch.empty_like(scale, dtype=torch.uint8)
    # The loop below runs once per input column, so it works on float copies of a group's scale
    # and zero point, and keeps the codes as floats until the end.
    group_scale: dict[int, torch.Tensor] = {}
    group_zero: dict[int, torch.Tensor] = {}
    low, high = code_range(bits, symmetric)
    codes = torch.empty(W.shape, dtype=torch.int8 if symmetric else torch.uint8, device=W.device)
    diagonal = torch.diagonal(U).tolist()
    # The column loop is thousands of small operations: one thread (the factorization above
    # used them all).
    with single_cpu_thread(W.device):
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1 = W[:, i1:i2]  # a view: the updates inside the block land in W directly
            U1 = U[i1:i2, i1:i2]
            pending = torch.zeros_like(W1)
            for i in range(i2 - i1):
                g = group_of[i1 + i]
                if g not in group_scale:
                    # None of the group's columns is quantized yet. Those inside this block are up to
                    # date; those after it still lack this block's pending (lazy) updates.
                    columns = position[g * group_size : (g + 1) * group_size]
                    current = W[:, columns] - pending[:, :i] @ U[i1 : i1 + i, columns]
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
                if errors is not None and alive[i1 + i]:
                    original = weight[:, columns_of[i1 + i]].float()
                    delta += (original - w_hat).double().square().sum().item()
                error = (w - w_hat).div_(diagonal[i1 + i])
                W1[:, i + 1 :].addr_(error, U1[i, i + 1 :], alpha=-1)
                pending[:, i] = error
            W[:, i2:].sub_(pending @ U[i1:i2, i2:])
            if errors is not None:
                damped += pending.double().square().sum().item()

    if errors is not None:
        errors["output"] = max(damped - factor.damping * delta, 0.0)
        # A slice of rows at a time: a float64 copy of a 7B MLP weight, squared, is 720 MB.
        norm = sum(
            rows.double().square().sum().item() for rows in weight.detach().split(_SIGNAL_ROWS)
        )
        errors["weight"] = math.sqrt((delta + dead_weights) / norm) if norm else 0.0
    return QuantizedWeight(
        codes=codes[:, position],
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


@dataclass
class OriginalWeight:
    """A layer's weight (the layer's own tensor: read it before the method changes it), and
    tr(W H Wᵀ) (what output errors are relative to)."""

    weight: torch.Tensor
    signal: float

    def relative_output_error(self, output_error: float) -> float:
        """√(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) from `errors["output"]` of the method's loop."""
        return math.sqrt(output_error / self.signal) if self.signal else 0.0


_SIGNAL_ROWS = 1024


def factored_layers(
    layers: dict[str, nn.Linear],
    hessians: dict[str, torch.Tensor],
    damping: float,
    *,
    act_order: bool,
    method: str,
    prefix: str,
) -> Iterator[tuple[str, OriginalWeight, HessianFactor]]:
    """(name, its original weight, its Hessian's factor) for each layer in turn, the Hessians
    consumed as they are factored: layers that share one Hessian (q/k/v) share one factor, and no
    Hessian outlives its factorization. Empties `hessians`."""
    signals = {}
    for name, layer in layers.items():  # before any Hessian is consumed
        W = working_weight(layer)
        # A slice of rows at a time: never the [out, in] product whole (180 MB on a 7B MLP).
        signals[name] = sum(
            ((rows @ hessians[name]) * rows).sum().item() for rows in W.split(_SIGNAL_ROWS)
        )
        del W
    users = Counter(id(hessian) for hessian in hessians.values())
    factors: dict[int, HessianFactor] = {}
    for name, layer in layers.items():
        hessian = hessians.pop(name)
        key = id(hessian)
        if key not in factors:
            factors[key] = inverse_hessian_factor(
                hessian, damping, act_order=act_order, method=method, layer=prefix + name,
                consume=True,
            )  # fmt: skip
        del hessian
        original = OriginalWeight(working_weight(layer), signals[name])
        yield name, original, factors[key]
        users[key] -= 1
        if not users[key]:
            del factors[key]


class GptqBlockHandler:
    """Quantizes the targeted layers of one block at a time (a `calibration.Handler`). A streamed
    block comes lazily (`lazy_block`): weights as stored, one layer upcast at a time."""

    lazy_block = True

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
        for name, original, factor in factored_layers(
            layers, hessians, config.damping, act_order=config.act_order, method="GPTQ",
            prefix=prefix,
        ):  # fmt: skip
            errors: dict = {}
            quantized = quantize_with(
                config, original.weight, factor, layer=prefix + name, errors=errors
            )
            attach(layers[name], quantized)
            summary[prefix + name] = {
                "relative_weight_error": errors["weight"],
                "relative_output_error": original.relative_output_error(errors["output"]),
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
        "layers": layers,  # per layer: the dashboard charts them
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
