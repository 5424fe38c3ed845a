"""The API's torch-free prediction from layer names and what the engine does on the module tree
read the same rules (`workers.compression.architectures`): held to one another here on real
transformers Llama and BERT trees."""

from __future__ import annotations

import re

import pytest
from torch import nn

from tests.engine.conftest import tiny_bert, tiny_llama
from workers.compression.architectures import LAYOUTS, block_prefix_from_names
from workers.compression.engine import compress
from workers.compression.layer_selection import block_prefix, linear_layers
from workers.compression.recipe import (
    Recipe,
    RtnConfig,
    StageConfig,
    StructuredConfig,
    group_size_conflicts,
    selected_linear_names,
    shapes_after,
)

MODELS = {
    "llama": lambda: tiny_llama(layers=3).model,
    "bert": lambda: tiny_bert(layers=3).model,
}


def linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    """What the API knows of a model: its Linear names with [out_features, in_features]."""
    return {
        name: [module.out_features, module.in_features]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


@pytest.mark.parametrize("architecture", MODELS)
def test_the_blocks_found_from_names_are_the_module_lists_blocks(architecture: str) -> None:
    model = MODELS[architecture]()
    assert block_prefix_from_names(list(linear_shapes(model))) == block_prefix(model)


@pytest.mark.parametrize("architecture", MODELS)
@pytest.mark.parametrize(
    "selection",
    [
        {},
        {"ignore": ["*.0.*"]},
        {"modules": ["Linear"]},
        {"modules": ["Linear"], "ignore": ["lm_head", "pooler.dense"]},
        {"modules": ["q_proj", "mlp.*", "attention.self.*", "intermediate.dense"]},
        {"modules": ["*.1.*"], "ignore": ["*down_proj", "output.dense"]},
    ],
)
def test_layers_selected_by_name_are_the_layers_the_engine_targets(
    architecture: str, selection: dict
) -> None:
    model = MODELS[architecture]()
    stage = StageConfig(method="selection", **selection)
    predicted = selected_linear_names(stage, list(linear_shapes(model)))
    targeted, _ = linear_layers(model, stage)
    assert predicted == targeted
    assert targeted  # every case selects something, so the comparison says something


@pytest.mark.parametrize("architecture", MODELS)
def test_every_layout_name_is_a_linear_layer_of_each_block(architecture: str) -> None:
    model = MODELS[architecture]()
    layout = LAYOUTS[model.config.model_type]
    names = [layout.query, layout.key, layout.value, layout.attention_output]
    names += [*layout.ffn_inputs, layout.ffn_output]
    prefix = block_prefix(model)
    for index in range(model.config.num_hidden_layers):
        for name in names:
            assert isinstance(model.get_submodule(f"{prefix}{index}.{name}"), nn.Linear)


@pytest.mark.parametrize("architecture", MODELS)
@pytest.mark.parametrize("fraction", [0.25, 0.3, 0.9])  # 16 / 64; 19.2 and 57.6 round
def test_predicted_shapes_after_structured_are_the_pruned_models(
    architecture: str, fraction: float
) -> None:
    model = MODELS[architecture]()
    stage = StructuredConfig(ffn_channels=fraction, criterion="magnitude")
    predicted = shapes_after(stage, linear_shapes(model))
    compress(model, Recipe(stages=[stage]))
    assert predicted == linear_shapes(model)
    assert predicted != linear_shapes(MODELS[architecture]())


@pytest.mark.parametrize("architecture", MODELS)
def test_group_size_conflicts_after_structured_are_the_layers_rtn_refuses(
    architecture: str,
) -> None:
    """64 FFN channels less 25% leave 48: groups of 32 no longer divide the FFN output's inputs."""
    model = MODELS[architecture]()
    structured = StructuredConfig(ffn_channels=0.25, criterion="magnitude")
    rtn = RtnConfig(group_size=32)
    predicted = group_size_conflicts(rtn, shapes_after(structured, linear_shapes(model)))
    compress(model, Recipe(stages=[structured]))
    widths = {name: model.get_submodule(name).in_features for name in linear_layers(model, rtn)[0]}
    assert predicted == [name for name, width in widths.items() if width % 32]
    assert len(predicted) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"input width 48 of {re.escape(predicted[0])}$"):
        compress(model, Recipe(stages=[rtn]))
