"""What both the API and the engine know about a model's layers from their names alone.

The API checks a recipe against a registered model's Linear names and shapes at submission,
without torch; the engine applies the recipe to the module tree. Both read the rules here (which
layers a stage targets, where the blocks are, which layers `structured` cuts in each architecture),
so the prediction at submission and what the engine does cannot drift apart.
`tests/unit/test_architectures.py` holds the two to one another on real Llama and BERT trees.

Standard library only: the API imports this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase


def matches(name: str, pattern: str) -> bool:
    """A pattern matches a full module name with fnmatch, or its dotted tail: `q_proj` matches
    `model.layers.0.self_attn.q_proj`, `lm_head` matches `lm_head`."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def select_layers(
    layer_types: dict[str, str],
    *,
    modules: list[str] | None,
    ignore: list[str],
    blocks: str | None,
) -> tuple[list[str], list[str]]:
    """(targeted, skipped) among `layer_types` (module name -> class name, in module order).

    `modules` None: every layer whose name starts with `blocks`, the block list's name with its
    dot (none when `blocks` is None). Otherwise the layers whose class name is one of `modules`
    (`Linear`) or whose name matches one of them. `ignore` then removes names."""

    def wanted(name: str, type_name: str) -> bool:
        if modules is None:
            return blocks is not None and name.startswith(blocks)
        return any(type_name == pattern or matches(name, pattern) for pattern in modules)

    targeted, skipped = [], []
    for name, type_name in layer_types.items():
        ignored = any(matches(name, pattern) for pattern in ignore)
        (targeted if wanted(name, type_name) and not ignored else skipped).append(name)
    return targeted, skipped


_BLOCK_INDEX = re.compile(r"^((?:[^.]+\.)*?)(\d+)\.")


def block_prefix_from_names(names: list[str]) -> str | None:
    """The block list's name with its dot (`model.layers.`, `encoder.layer.`) from module names
    alone: the prefix followed by the most distinct indices. The engine finds the same list on the
    module tree as the longest nn.ModuleList of one class (`layer_selection.block_prefix`)."""
    indices: dict[str, set[str]] = {}
    for name in names:
        match = _BLOCK_INDEX.match(name)
        if match:
            indices.setdefault(match.group(1), set()).add(match.group(2))
    if not indices:
        return None
    return max(indices, key=lambda prefix: len(indices[prefix]))


def name_in_block(name: str, blocks: str) -> str | None:
    """`model.layers.3.mlp.down_proj` -> `mlp.down_proj` for blocks `model.layers.`; None for a
    name outside the blocks."""
    if not name.startswith(blocks):
        return None
    index, _, inner = name[len(blocks) :].partition(".")
    return inner if index.isdigit() and inner else None


@dataclass(frozen=True)
class Layout:
    """Where one architecture's block keeps the layers structured pruning cuts (names inside the
    block), and why its heads cannot be removed, if they cannot."""

    query: str
    key: str
    value: str
    attention_output: str
    ffn_inputs: tuple[str, ...]  # their rows are the FFN channels
    ffn_output: str  # its columns are the FFN channels
    mlp: str | None = None  # a module that keeps its own `intermediate_size`
    heads_refused: str | None = None


# By the transformers config's `model_type`.
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attention_output="self_attn.o_proj",
        ffn_inputs=("mlp.gate_proj", "mlp.up_proj"),
        ffn_output="mlp.down_proj",
        mlp="mlp",
    ),
    "bert": Layout(
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        ffn_inputs=("intermediate.dense",),
        ffn_output="output.dense",
        # BertSelfAttention computes its head size as hidden_size / num_attention_heads, so a
        # checkpoint with fewer heads of the same size does not load in transformers.
        heads_refused="BERT derives its head size from hidden_size / num_attention_heads, so a "
        "BERT with fewer heads would not load in transformers; prune ffn_channels only",
    ),
}

# The FFN layers of every layout, by their name inside a block, for when only names are known
# (a registered model's Linear shapes carry no model_type): outputs of the first are FFN channels,
# inputs of the second. No name in one layout means something else in another.
FFN_WIDENING = frozenset(name for layout in LAYOUTS.values() for name in layout.ffn_inputs)
FFN_NARROWING = frozenset(layout.ffn_output for layout in LAYOUTS.values())
