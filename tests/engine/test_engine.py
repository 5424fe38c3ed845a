"""`engine.compress` reads what the stages declare: calibration is checked once, before any stage
runs, instead of in each method."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_quant import state
from workers.compression import compress
from workers.compression.loading import LoadedModel
from workers.compression.recipe import Recipe


@pytest.mark.parametrize(
    ("stages", "needing"),
    [
        ([{"method": "rtn", "group_size": 16}, {"method": "gptq", "group_size": 16}], "gptq"),
        ([{"method": "magnitude"}, {"method": "structured", "ffn_channels": 0.5}], "structured"),
        ([{"method": "smoothquant"}, {"method": "w8a8"}], "smoothquant"),
    ],
)
def test_a_stage_needing_calibration_is_refused_before_any_stage_runs(
    llama: LoadedModel, stages: list[dict], needing: str
) -> None:
    before = state(llama.model)
    with pytest.raises(ValueError, match=f"^{needing} needs calibration data$"):
        compress(llama.model, Recipe.model_validate({"stages": stages}))
    after = state(llama.model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_stages_that_need_no_calibration_run_without_it(llama: LoadedModel) -> None:
    recipe = Recipe.model_validate(
        {
            "stages": [
                {"method": "structured", "ffn_channels": 0.5, "criterion": "magnitude"},
                {"method": "w8a8", "activations": "dynamic"},
            ]
        }
    )
    result = compress(llama.model, recipe)
    assert [stage["method"] for stage in result.stages] == ["structured", "w8a8"]
    assert result.stages[1]["quantized_layers"] == 7 * llama.model.config.num_hidden_layers
