"""Structured pruning: remove whole attention heads and FFN channels, so that the weight matrices
and the model's config really shrink (width pruning, as in LLM-Pruner, Ma, Fang, Wang 2023, and
FLAP, An et al. 2024; here without retraining or bias compensation).

Units. An FFN channel j is row j of the layers that produce the FFN's hidden activations
(Llama's gate_proj and up_proj, BERT's intermediate.dense, with its bias) and column j of the layer
that reads them (down_proj, output.dense). An attention unit is one key/value group: a k/v head
with every query head that attends with it. Grouped-query attention shares each k/v head among
num_attention_heads / num_key_value_heads query heads (query head h uses k/v head h // group
size), so removing whole groups keeps that ratio, and the layer stays valid; without GQA a group
is one head. A head is its rows of q/k/v and its columns of o_proj.

Importance. `activation` scores a unit by how much it adds to its layer's output on the calibration
data: the norm, over calibration tokens, of its contribution to the output of down_proj / o_proj.
For an FFN channel with activations a_j (the input of down_proj's column j) that is exactly
‖a_j‖·‖W_down[:, j]‖, Wanda's |W|·‖X‖ (Sun et al. 2023) for a whole column; for a head h with
o_proj inputs X_h [tokens, head_dim] it is √tr(W_h X_hᵀX_h W_hᵀ), W_h its o_proj columns, and a
group's score is the root sum of squares of its heads'. Removing the units that contribute least
changes the output least, up to their interactions. `magnitude` needs no data: a unit's score is
the L2 norm of all the weights removed with it.

Uniform. transformers' Llama and BERT configs hold one intermediate_size and one head count for all
layers, so every block loses the same number of units (its own lowest-scoring ones), and the
result is a standard model that plain `from_pretrained` loads.

Order. With `activation`, blocks are scored and pruned one after another (`calibration.
run_blockwise`): each block is scored on what the already-pruned blocks before it produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from workers.compression.architectures import LAYOUTS, Layout
from workers.compression.calibration import (
    BlockCheckpoint,
    BlockInputs,
    SavedProgress,
    linear_inputs,
    model_blocks,
    resident_block,
    run_blockwise,
)
from workers.compression.evaluation import parameter_count
from workers.compression.layer_selection import linear_layers
from workers.compression.recipe import StructuredConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.streaming import store_of


@dataclass(frozen=True)
class Plan:
    """Per-block sizes before and after (the same in every block), checked before any change."""

    layout: Layout
    heads: int
    kv_heads: int
    head_dim: int
    kv_heads_kept: int
    ffn_channels: int
    ffn_channels_kept: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def heads_kept(self) -> int:
        return self.kv_heads_kept * self.heads_per_group

    @property
    def prunes_heads(self) -> bool:
        return self.kv_heads_kept < self.kv_heads

    @property
    def prunes_ffn(self) -> bool:
        return self.ffn_channels_kept < self.ffn_channels

    def layers(self) -> list[str]:
        """Names, inside a block, of the Linear layers this plan cuts."""
        layout, names = self.layout, []
        if self.prunes_heads:
            names += [layout.query, layout.key, layout.value, layout.attention_output]
        if self.prunes_ffn:
            names += [*layout.ffn_inputs, layout.ffn_output]
        return names


def units_removed(fraction: float, total: int, what: str, field: str) -> int:
    """round(fraction · total), refusing a count that removes nothing or everything."""
    count = math.floor(fraction * total + 0.5)
    if fraction > 0 and count == 0:
        raise ValueError(
            f"{field} {fraction} of {total} {what} removes none; the smallest fraction that "
            f"removes one is {0.5 / total:.3g}"
        )
    if count >= total:
        raise ValueError(f"{field} {fraction} would remove all {total} {what} of every layer")
    return count


def plan_for(model: nn.Module, config: StructuredConfig) -> Plan:
    """What to remove per block, after every check, so that a request that cannot apply changes
    nothing."""
    model_type = getattr(model.config, "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise ValueError(
            f"structured pruning supports {', '.join(sorted(LAYOUTS))} models "
            f"(LlamaForCausalLM, LlamaModel, BertModel); this one is {model_type!r}"
        )
    if config.attention_heads > 0 and layout.heads_refused:
        raise ValueError(f"attention_heads cannot be pruned: {layout.heads_refused}")

    model_config = model.config
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    ffn_channels = model_config.intermediate_size
    blocks_name, blocks = model_blocks(model)
    first = blocks[0]
    head_dim = first.get_submodule(layout.query).out_features // heads
    expected = {
        layout.query: heads * head_dim,
        layout.key: kv_heads * head_dim,
        layout.value: kv_heads * head_dim,
        **{name: ffn_channels for name in layout.ffn_inputs},
    }
    for name, width in expected.items():
        found = first.get_submodule(name).out_features
        if found != width:
            raise ValueError(f"{name} has {found} outputs, but the model's config implies {width}")

    kv_removed = units_removed(
        config.attention_heads, kv_heads, "key/value head groups", "attention_heads"
    )
    plan = Plan(
        layout=layout,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_heads_kept=kv_heads - kv_removed,
        ffn_channels=ffn_channels,
        ffn_channels_kept=ffn_channels
        - units_removed(config.ffn_channels, ffn_channels, "FFN channels", "ffn_channels"),
    )
    hidden = model_config.hidden_size
    if model_type == "llama" and plan.prunes_heads and hidden % plan.heads_kept:
        # transformers' LlamaConfig refuses such a config when it is loaded (validate_architecture)
        # even though head_dim is stored explicitly.
        working = [
            f"{(kv_heads - kept) / kv_heads:.3g}"
            for kept in range(kv_heads - 1, 0, -1)
            if hidden % (kept * plan.heads_per_group) == 0
        ]
        raise ValueError(
            f"attention_heads {config.attention_heads} keeps {plan.heads_kept} heads, which does "
            f"not divide hidden_size {hidden} (transformers' LlamaConfig requires that); fractions "
            f"that work: {', '.join(working) or 'none'}"
        )

    targeted, _ = linear_layers(model, config)
    needed = [
        f"{blocks_name}.{index}.{name}" for index in range(len(blocks)) for name in plan.layers()
    ]
    left_out = sorted(set(needed) - set(targeted))
    if left_out:
        raise ValueError(
            "structured pruning removes the same units from every block (the config holds one size "
            f"for all), so it cannot leave {', '.join(left_out[:4])}"
            + (f" and {len(left_out) - 4} more" if len(left_out) > 4 else "")
            + " alone; change `modules` / `ignore`"
        )
    return plan


# --- importance scores: one number per unit of a block, larger = more important ---


def ffn_magnitude_scores(block: nn.Module, layout: Layout) -> torch.Tensor:
    """‖all weights of channel j‖₂: its rows of the FFN inputs and its column of the output."""
    squares = block.get_submodule(layout.ffn_output).weight.float().square().sum(0)
    for name in layout.ffn_inputs:
        squares += block.get_submodule(name).weight.float().square().sum(1)
    return squares.sqrt()


def head_magnitude_scores(block: nn.Module, plan: Plan) -> torch.Tensor:
    """‖all weights of k/v group g‖₂: its k and v rows, its query heads' q rows and o columns."""
    layout, d = plan.layout, plan.head_dim

    def per_head(weight: torch.Tensor) -> torch.Tensor:  # [heads · d, in] -> [heads]
        return weight.float().square().reshape(-1, d, weight.shape[1]).sum((1, 2))

    queries = per_head(block.get_submodule(layout.query).weight)
    queries += per_head(block.get_submodule(layout.attention_output).weight.T)
    squares = queries.reshape(plan.kv_heads, plan.heads_per_group).sum(1)
    squares += per_head(block.get_submodule(layout.key).weight)
    squares += per_head(block.get_submodule(layout.value).weight)
    return squares.sqrt()


def ffn_activation_scores(sum_of_squares: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
    """‖a_j‖·‖W[:, j]‖: the norm of channel j's contribution to the FFN output, from Σ_t a_tj²."""
    return sum_of_squares.sqrt() * ffn_output.float().norm(dim=0)


def head_activation_scores(
    gram: torch.Tensor, attention_output: torch.Tensor, plan: Plan
) -> torch.Tensor:
    """Norm of each k/v group's contribution to o_proj's output, from the per-head Gram matrices
    X_hᵀX_h [heads, d, d] of o_proj's input: ‖X_h W_hᵀ‖² = tr(W_h X_hᵀX_h W_hᵀ)."""
    d = plan.head_dim
    W = attention_output.float().reshape(-1, plan.heads, d).transpose(0, 1)  # [heads, out, d]
    per_head = ((W @ gram) * W).sum((1, 2)).clamp(min=0)
    return per_head.reshape(plan.kv_heads, plan.heads_per_group).sum(1).sqrt()


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """The `count` lowest-scoring units, in index order; ties go to the lower index (stable)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[:count].tolist())


# --- shrinking ---


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    pruned = nn.Linear(
        linear.in_features,
        len(index),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        pruned.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            pruned.bias.copy_(linear.bias[index])
    return pruned


def _columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    pruned = nn.Linear(
        len(index),
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        pruned.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            pruned.bias.copy_(linear.bias)
    return pruned


def _head_channels(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Rows of a [heads · head_dim, in] projection that belong to `heads`."""
    offsets = torch.arange(head_dim, device=device)
    return torch.cat([head * head_dim + offsets for head in heads])


def shrink_block(
    block: nn.Module, plan: Plan, *, kept_groups: list[int], kept_channels: list[int]
) -> None:
    """Replace the block's cut layers by smaller nn.Linear keeping only the given k/v groups and
    FFN channels (in their original order)."""
    layout = plan.layout
    device = block.get_submodule(layout.query).weight.device
    if plan.prunes_heads:
        kept_heads = [
            g * plan.heads_per_group + r for g in kept_groups for r in range(plan.heads_per_group)
        ]
        queries = _head_channels(kept_heads, plan.head_dim, device)
        keys = _head_channels(kept_groups, plan.head_dim, device)
        for name, index in ((layout.query, queries), (layout.key, keys), (layout.value, keys)):
            block.set_submodule(name, _rows(block.get_submodule(name), index))
        output = block.get_submodule(layout.attention_output)
        block.set_submodule(layout.attention_output, _columns(output, queries))
        # Llama's attention keeps head_dim, scaling and num_key_value_groups (query heads per k/v
        # head); removing whole groups changes none of them, and it infers the head count from the
        # projections' widths.
    if plan.prunes_ffn:
        channels = torch.tensor(kept_channels, device=device)
        for name in layout.ffn_inputs:
            block.set_submodule(name, _rows(block.get_submodule(name), channels))
        output = block.get_submodule(layout.ffn_output)
        block.set_submodule(layout.ffn_output, _columns(output, channels))
        if layout.mlp is not None:
            block.get_submodule(layout.mlp).intermediate_size = len(kept_channels)


def prune_block(block: nn.Module, plan: Plan, head_scores, ffn_scores) -> dict:  # noqa: ANN001
    """Remove the lowest-scoring units of one block; what was removed, for the summary."""
    removed_groups = (
        lowest(head_scores, plan.kv_heads - plan.kv_heads_kept) if plan.prunes_heads else []
    )
    removed_channels = (
        lowest(ffn_scores, plan.ffn_channels - plan.ffn_channels_kept) if plan.prunes_ffn else []
    )
    shrink_block(
        block,
        plan,
        kept_groups=sorted(set(range(plan.kv_heads)) - set(removed_groups)),
        kept_channels=sorted(set(range(plan.ffn_channels)) - set(removed_channels)),
    )
    return {"removed_kv_groups": removed_groups}


class StructuredBlockHandler:
    """Scores the units of one block on its calibration inputs and prunes it (a
    `calibration.Handler`)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> dict:
        plan, layout = self.plan, self.plan.layout
        observed = {}
        if plan.prunes_heads:
            observed[layout.attention_output] = block.get_submodule(layout.attention_output)
        if plan.prunes_ffn:
            observed[layout.ffn_output] = block.get_submodule(layout.ffn_output)
        totals: dict[str, torch.Tensor] = {}

        def accumulate(name: str, x: torch.Tensor) -> None:
            x = x.float()
            if name == layout.attention_output:
                per_head = x.reshape(-1, plan.heads, plan.head_dim)
                value = torch.einsum("thd,the->hde", per_head, per_head)  # X_hᵀX_h per head
            else:
                value = x.square().sum(0)
            totals[name] = totals[name] + value if name in totals else value

        with linear_inputs(block, observed, accumulate):
            inputs.run(block)
        head_scores = ffn_scores = None
        if plan.prunes_heads:
            output = observed[layout.attention_output].weight
            head_scores = head_activation_scores(totals[layout.attention_output], output, plan)
        if plan.prunes_ffn:
            output = observed[layout.ffn_output].weight
            ffn_scores = ffn_activation_scores(totals[layout.ffn_output], output)
        return prune_block(block, plan, head_scores, ffn_scores)


class ShrinkOnResume:
    """A `BlockCheckpoint` wrapper for `run_blockwise`: when saved progress is found, it first
    gives the finished blocks their pruned shapes, so that their saved (smaller) weights load into
    them. Which units it keeps there does not matter: restoring overwrites every weight. A streamed
    block is shrunk where it lies (on the meta device) and its saved tensors become what it is
    onloaded from: the checkpoint's full-size tensors no longer fit it."""

    def __init__(self, checkpoint: BlockCheckpoint, model: nn.Module, plan: Plan) -> None:
        self.checkpoint, self.model, self.plan = checkpoint, model, plan

    def load(self) -> SavedProgress | None:
        saved = self.checkpoint.load()
        if saved is not None:
            _, blocks = model_blocks(self.model)
            store = store_of(self.model)
            for index in range(saved.next_block):
                shrink_block(
                    blocks[index],
                    self.plan,
                    kept_groups=list(range(self.plan.kv_heads_kept)),
                    kept_channels=list(range(self.plan.ffn_channels_kept)),
                )
                if store is not None:
                    store.put(index, saved.block_states[index])
        return saved

    def save(self, **progress) -> None:  # noqa: ANN003
        self.checkpoint.save(**progress)


def rewrite_config(model: nn.Module, plan: Plan) -> None:
    """The config transformers rebuilds the model from: one size for every layer."""
    config = model.config
    config.intermediate_size = plan.ffn_channels_kept
    if plan.prunes_heads:
        config.num_attention_heads = plan.heads_kept
        config.num_key_value_heads = plan.kv_heads_kept
        # Llama computes head_dim as hidden_size / num_attention_heads when the config has none.
        config.head_dim = plan.head_dim


@register_method(StructuredConfig)
def structured(model: nn.Module, config: StructuredConfig, context: StageContext) -> dict:
    plan = plan_for(model, config)
    parameters_before = parameter_count(model)
    blocks_name, blocks = model_blocks(model)

    if config.criterion == "activation":
        checkpoint = context.checkpoint
        per_block = run_blockwise(
            model,
            context.calibration,
            StructuredBlockHandler(plan),
            progress=context.report,
            checkpoint=ShrinkOnResume(checkpoint, model, plan) if checkpoint else None,
        )
        samples = len(context.calibration)
        tokens = sum(ids.numel() for ids in context.calibration)
    else:
        per_block = []
        store = store_of(model)  # streamed: each block onloaded, pruned and stored in turn
        for index in range(len(blocks)):
            with resident_block(store, blocks, index) as block:
                head_scores = head_magnitude_scores(block, plan) if plan.prunes_heads else None
                ffn_scores = ffn_magnitude_scores(block, plan.layout) if plan.prunes_ffn else None
                per_block.append(prune_block(block, plan, head_scores, ffn_scores))
            context.report(index + 1, len(blocks), f"pruned {blocks_name}.{index}", unit="block")
        samples = tokens = 0
    rewrite_config(model, plan)

    summary = {
        "criterion": config.criterion,
        "layers": len(blocks),
        "attention_heads": {"before": plan.heads, "after": plan.heads_kept},
        "kv_heads": {"before": plan.kv_heads, "after": plan.kv_heads_kept},
        "head_dim": plan.head_dim,
        "ffn_channels": {"before": plan.ffn_channels, "after": plan.ffn_channels_kept},
        "parameters": {"before": parameters_before, "after": parameter_count(model)},
        "pruned_layers": len(plan.layers()) * len(blocks),
        "calibration_samples": samples,
        "calibration_tokens": tokens,
    }
    if plan.prunes_heads:
        summary["removed_kv_groups"] = [block["removed_kv_groups"] for block in per_block]
    return summary
