"""The candidates a search chooses among: uniform ladders and per-unit (block or layer) choices.

A *unit* is a group of Linear layers that take one choice together: a block's layers (the default:
30 choices for SmolLM2, measured in seconds) or each layer alone. An *option* is one weight-only
stage config (method, bits, group size) or None, the layers left in float. A mixed choice becomes an
ordinary recipe: one stage per option used, its `modules` naming exactly the layers it takes, so
`compress` runs it and the export writes one compressed-tensors config group per scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import Recipe, StageConfig, W8A8Config, WeightOnlyConfig
from workers.compression.search.defaults import DEFAULT_WEIGHT_ONLY_RUNGS


@dataclass(frozen=True)
class Unit:
    name: str  # the block's name ("model.layers.3") or the layer's
    layers: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # [out, in] per layer

    @property
    def weights(self) -> int:
        return sum(out * inp for out, inp in self.shapes)


# A stage a search can give per unit: weight-only (bits per unit, the ladder's rungs) or W8A8 (one
# precision: each unit W8A8 or float).
SearchableStage = WeightOnlyConfig | W8A8Config


def searchable_stage(recipe: Recipe) -> SearchableStage | None:
    """The recipe's one weight-only or W8A8 stage, when that is all it is: then per-unit choices
    apply."""
    if len(recipe.stages) == 1 and isinstance(recipe.stages[0], WeightOnlyConfig | W8A8Config):
        return recipe.stages[0]
    return None


def ladder(recipe: Recipe) -> list[Recipe]:
    """Uniform recipes from `recipe` (the most aggressive) to the least aggressive: a recipe that
    is one weight-only stage gets the default rungs (`defaults.py`, torch-free: the API reads it)
    that keep more bits than it; `gptq`/`awq` recipes keep their own method on every rung. W8A8
    has one precision: its ladder is the recipe alone (float is the next step, per unit)."""
    stage = searchable_stage(recipe)
    if stage is None or isinstance(stage, W8A8Config):
        return [recipe]
    rungs = [recipe]
    for rung in DEFAULT_WEIGHT_ONLY_RUNGS:
        candidate = stage.model_copy(update=rung)
        if _nominal_bits(candidate) > _nominal_bits(rungs[-1].stages[0]):
            rungs.append(Recipe(stages=[candidate]))
    return rungs


def options(recipe: Recipe) -> list[SearchableStage | None]:
    """Per-unit options, cheapest first, float (None) last."""
    return [rung.stages[0] for rung in ladder(recipe)] + [None]


def units(model: nn.Module, stage: StageConfig, *, granularity: str = "block") -> list[Unit]:
    """The stage's targeted layers grouped by block (or one unit per layer), in model order."""
    targeted, _ = linear_layers(model, stage)
    grouped: dict[str, list[str]] = {}
    for name in targeted:
        key = name if granularity == "layer" else block_of(name)
        grouped.setdefault(key, []).append(name)
    return [
        Unit(
            name=key,
            layers=tuple(names),
            shapes=tuple(tuple(model.get_submodule(n).weight.shape) for n in names),
        )
        for key, names in grouped.items()
    ]


def mixed_recipe(
    template: SearchableStage, chosen: list[SearchableStage | None], all_units: list[Unit]
) -> Recipe | None:
    """The recipe giving unit i option chosen[i]; None when every unit stays float."""
    by_option: dict[str, tuple[SearchableStage, list[str]]] = {}
    for option, unit in zip(chosen, all_units, strict=True):
        if option is None:
            continue
        key = option.model_dump_json()
        by_option.setdefault(key, (option, []))[1].extend(unit.layers)
    if not by_option:
        return None
    if len(by_option) == 1 and None not in chosen:
        # Every unit the same option: that is the option's uniform rung, written as the ladder
        # writes it, so a search sees it as the trial it may already have measured.
        return Recipe(stages=[chosen[0]])
    # Fewest bits first: the recipe reads like the ladder.
    stages = [
        option.model_copy(update={"modules": layers, "ignore": []})
        for option, layers in sorted(by_option.values(), key=lambda item: _nominal_bits(item[0]))
    ]
    del template
    return Recipe(stages=stages)


def stored_bits(shape: tuple[int, int], option: SearchableStage | None, float_bits: int) -> int:
    """Bits the export stores for one [out, in] weight: packed codes, float32 scales (and packed
    zero points when asymmetric), or the float weight. W8A8: int8 codes, a float32 scale per
    output channel and, with static activations, one float32 input scale."""
    out_features, in_features = shape
    if option is None:
        return out_features * in_features * float_bits
    if isinstance(option, W8A8Config):
        static = 32 if option.activations == "static" else 0
        return out_features * in_features * 8 + out_features * 32 + static
    group = in_features if option.group_size == -1 else option.group_size
    groups = in_features // group
    codes = out_features * math.ceil(in_features * option.bits / 32) * 32
    scales = out_features * groups * 32
    zeros = 0 if option.symmetric else math.ceil(out_features * option.bits / 32) * 32 * groups
    return codes + scales + zeros


def unit_bits(unit: Unit, option: SearchableStage | None, float_bits: int) -> int:
    return sum(stored_bits(shape, option, float_bits) for shape in unit.shapes)


def _nominal_bits(stage: SearchableStage) -> float:
    if isinstance(stage, W8A8Config):
        return 8 + 32 / 4096
    group = 4096 if stage.group_size == -1 else stage.group_size
    return stage.bits + 32 / group


def block_of(name: str) -> str:
    # "model.layers.3.self_attn.q_proj" -> "model.layers.3": up to the first numeric part.
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return name
