"""Magnitude pruning: remove the weights of smallest |W_ij| in each row, no calibration data.

The baseline the calibrated methods (wanda, sparsegpt) are measured against. Masks and patterns
are `sparsity.py`'s; the pruned layers stay nn.Linear with exact zeros and are marked for the
sparse export. The helpers here (which layers, what the summary says) are shared by all three.
"""

from __future__ import annotations

from torch import nn

from workers.compression.calibration import outside_blocks
from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import MagnitudeConfig, SparsityConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.sparsity import ATTRIBUTE, mask_for, prune_, sparsity_of
from workers.compression.streaming import resident_layers


def sparsity_targets(
    model: nn.Module, config: SparsityConfig, *, blockwise: bool
) -> tuple[list[str], list[str]]:
    """(targeted, skipped) Linear names, after checking everything that could stop the stage half
    way, so that a recipe that cannot apply changes nothing: 2:4 needs input widths divisible by 4,
    and the calibrated methods (`blockwise`) see layer inputs block by block only."""
    targeted, skipped = linear_layers(model, config)
    if not targeted:
        raise ValueError(f"{config.method} matched no Linear layer; check `modules` and `ignore`")
    if config.pattern == "2:4":
        odd = [name for name in targeted if model.get_submodule(name).in_features % 4]
        if odd:
            raise ValueError(
                f"2:4 sparsity needs input widths divisible by 4; {', '.join(odd[:5])} are not "
                "(`ignore` them)"
            )
    if blockwise:
        outside = outside_blocks(model, targeted)
        if outside:
            raise ValueError(
                f"{config.method} prunes layers inside the model's blocks only; "
                f"{', '.join(outside)} are outside them (prune them in a `magnitude` stage, or "
                "`ignore` them)"
            )
    return targeted, skipped


def pruning_summary(
    model: nn.Module, config: SparsityConfig, targeted: list[str], skipped: list[str]
) -> dict:
    """What a pruning stage reports, counted from the weights themselves (so a run resumed from a
    checkpoint reports the same), and the marks the sparse export reads."""
    layer_sparsity, nonzero, total = {}, 0, 0
    for name, linear in resident_layers(model, targeted, keep_changes=False):
        setattr(linear, ATTRIBUTE, config.pattern)
        counts = sparsity_of(linear.weight.detach())
        layer_sparsity[name] = round(counts["sparsity"], 6)
        nonzero += counts["nonzero"]
        total += linear.weight.numel()
    return {
        "pruned_layers": len(targeted),
        "pruned": targeted,
        "skipped": skipped,
        "pattern": config.pattern,
        "target_sparsity": config.sparsity,
        "sparsity": round((total - nonzero) / total, 6),
        "nonzero_parameters": nonzero,
        "layer_sparsity": layer_sparsity,
    }


@register_method(MagnitudeConfig)
def magnitude(model: nn.Module, config: MagnitudeConfig, context: StageContext) -> dict:
    targeted, skipped = sparsity_targets(model, config, blockwise=False)
    for step, (name, linear) in enumerate(resident_layers(model, targeted), start=1):
        scores = linear.weight.detach().abs()
        prune_(
            linear,
            mask_for(scores, sparsity=config.sparsity, pattern=config.pattern),
            pattern=config.pattern,
        )
        context.report(step, len(targeted), f"pruned {name}", unit="layer")
    return pruning_summary(model, config, targeted, skipped)
