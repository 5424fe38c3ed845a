"""What each stage config declares about itself, read by recipe validation, the API and the
engine in place of tables of method names."""

from __future__ import annotations

import pytest

from workers.compression.recipe import STAGE_CONFIGS, DistillConfig, Recipe


def method(config: type) -> str:
    return config.model_fields["method"].default


def test_quantizing_stages_name_the_storage_family_their_layers_end_in() -> None:
    families = {method(config): config.family for config in STAGE_CONFIGS if config.family}
    assert families == {
        "dynamic_int8": "int8 weights and activations",
        "w8a8": "int8 weights and activations",
        "rtn": "weight-only integer",
        "gptq": "weight-only integer",
        "awq": "weight-only integer",
        "fp8": "fp8",
    }


def test_stages_that_change_float_weights_and_those_that_shrink() -> None:
    rescaling = {method(config) for config in STAGE_CONFIGS if config.rescales_weights}
    assert rescaling == {
        "smoothquant", "awq", "magnitude", "wanda", "sparsegpt", "structured", "distill"
    }  # fmt: skip
    assert {method(config) for config in STAGE_CONFIGS if config.shrinks} == {
        "structured", "magnitude", "wanda", "sparsegpt"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "needs"),
    [
        ({"method": "dynamic_int8"}, False),
        ({"method": "rtn"}, False),
        ({"method": "fp8"}, False),
        ({"method": "magnitude"}, False),
        ({"method": "distill", "student": {"num_layers": 1}}, False),
        ({"method": "w8a8", "activations": "dynamic"}, False),
        ({"method": "structured", "ffn_channels": 0.5, "criterion": "magnitude"}, False),
        ({"method": "w8a8"}, False),  # dynamic by default
        ({"method": "w8a8", "activations": "static"}, True),
        ({"method": "structured", "ffn_channels": 0.5}, True),
        ({"method": "gptq"}, True),
        ({"method": "awq"}, True),
        ({"method": "wanda"}, True),
        ({"method": "sparsegpt"}, True),
    ],
)
def test_needs_calibration_per_stage(stage: dict, needs: bool) -> None:
    (parsed,) = Recipe.model_validate({"stages": [stage]}).stages
    assert parsed.needs_calibration is needs


def test_only_a_studentless_distill_needs_the_original() -> None:
    assert DistillConfig().needs_original()
    assert not DistillConfig(student={"num_layers": 2}).needs_original()
    assert not any(
        config.model_construct().needs_original()
        for config in STAGE_CONFIGS
        if config is not DistillConfig
    )


def test_referenced_ids_are_the_student_model_and_the_training_text() -> None:
    distill = DistillConfig(student={"model_id": "mdl_student"}, dataset_id="ds_text")
    assert distill.referenced_ids() == {"model_ids": ["mdl_student"], "dataset_ids": ["ds_text"]}
    assert DistillConfig(student={"num_layers": 2}).referenced_ids() == {
        "model_ids": [],
        "dataset_ids": [],
    }
    (gptq,) = Recipe.model_validate({"stages": [{"method": "gptq"}]}).stages
    assert gptq.referenced_ids() == {"model_ids": [], "dataset_ids": []}
