"""`parameters` and `bits_per_weight` count logical weights in every export layout.

Each test compresses a tiny Llama, exports it and measures `size` on the artifact's files and on
the model `load_artifact` builds from them: the parameters are the float model's, whatever the
layout packs them into, and `bits_per_weight` is every bit stored for the Linear weights (values,
scales, zero points, masks, shapes) per weight, computed here from the layout's definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.evaluation import Evaluator, parameter_count
from workers.compression.export import load_artifact, save_model
from workers.compression.formats import weight_census
from workers.compression.recipe import EvaluationSettings, Recipe
from workers.compression.runtime.weight_only import cpu_kernels


def size_of(loaded, model, records, folder=None) -> dict:
    harness = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=EvaluationSettings(metrics=["size"]),
        records=records,
        device="cpu",
    )
    return harness.measure(model, folder=folder)


def block_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the Linear layers inside the blocks (what the stages touch)."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    }


def export(loaded, folder, **options):
    save_model(loaded, loaded.model, folder, recipe={}, metrics={}, inputs={}, **options)
    return folder


def stored_bits(shapes: dict[str, tuple[int, int]], layer_bits) -> float:
    weights = sum(out * inputs for out, inputs in shapes.values())
    return sum(layer_bits(out, inputs) for out, inputs in shapes.values()) / weights


def check(loaded, records, folder, expected_bits, *, storage_format, parameters):
    files = size_of(loaded, loaded.model, records, folder)
    assert files["size_source"] == "weight files"
    assert files["parameters"] == parameters
    assert files["bits_per_weight"] == pytest.approx(expected_bits, rel=1e-9)
    assert files["bits_per_parameter"] == pytest.approx(8 * files["size_bytes"] / parameters)
    census = weight_census(folder, [])
    assert census.format == storage_format and census.parameters == parameters
    artifact = load_artifact(folder)
    assert parameter_count(artifact.model) == parameters
    assert size_of(artifact, artifact.model, records, folder)["parameters"] == parameters
    return files


def test_a_dense_float_folder_is_32_bits_per_weight(llama, records, tmp_path):
    parameters = parameter_count(llama.model)
    folder = export(llama, tmp_path / "dense")
    files = check(llama, records, folder, 32.0, storage_format="dense", parameters=parameters)
    in_memory = size_of(llama, llama.model, records)
    assert in_memory["parameters"] == parameters and in_memory["bits_per_weight"] == 32.0
    # The tied head is one tensor: counted once, as the model's parameters count it.
    assert parameters == sum(p.numel() for p in llama.model.parameters())
    assert files["bits_per_parameter"] > 32  # the header, and nothing else


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_quantized_int4_counts_its_packed_codes(make_llama, records, tmp_path, symmetric):
    loaded = make_llama(hidden=64)  # shapes the int4 CPU kernel runs, in groups of 32
    parameters = parameter_count(loaded.model)
    shapes = block_linears(loaded.model)
    stage = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": symmetric}
    compress(loaded.model, Recipe.model_validate({"stages": [stage]}))
    folder = export(loaded, tmp_path / "int4")

    def layer_bits(out, inputs):
        groups = inputs // 32
        bits = 32 * out * math.ceil(inputs * 4 / 32) + 32 * out * groups + 64 * 2  # codes, scales
        if not symmetric:  # zero points packed down each column
            bits += 32 * math.ceil(out * 4 / 32) * groups
        return bits

    expected = stored_bits(shapes, layer_bits)
    # 4 bits, plus a float32 scale per 32 weights (plus a 4-bit zero point), plus the shape.
    assert 5.0 < expected < 5.05 + (0 if symmetric else 0.125)
    check(
        loaded,
        records,
        folder,
        expected,
        storage_format="pack-quantized",
        parameters=parameters,
    )
    artifact = load_artifact(folder)
    if "int4" in cpu_kernels():  # the loaded model holds the codes as packed buffers
        kernels = artifact.model.slimformer_runtime["kernels"]
        assert kernels.get("int4") == len(shapes), kernels


def test_int_quantized_w8a8_counts_int8_weights_and_scales(make_llama, records, tmp_path):
    loaded = make_llama()
    parameters = parameter_count(loaded.model)
    shapes = block_linears(loaded.model)
    calibration = calibration_batches(
        [r["text"] for r in records], loaded.tokenizer, num_samples=4, seq_len=8, seed=0
    )
    recipe = Recipe.model_validate({"stages": [{"method": "w8a8", "activations": "static"}]})
    compress(loaded.model, recipe, calibration)
    folder = export(loaded, tmp_path / "w8a8")
    # int8 values, a float32 scale per output channel and one float32 input scale per layer.
    expected = stored_bits(shapes, lambda out, inputs: 8 * out * inputs + 32 * out + 32)
    check(loaded, records, folder, expected, storage_format="int-quantized", parameters=parameters)


def test_int_quantized_dynamic_int8_counts_torch_int8_layers(make_llama, records, tmp_path):
    loaded = make_llama()
    parameters = parameter_count(loaded.model)
    shapes = block_linears(loaded.model)
    compress(loaded.model, Recipe.model_validate({"stages": [{"method": "dynamic_int8"}]}))
    assert parameter_count(loaded.model) == parameters  # torch's int8 Linear, in memory
    folder = export(loaded, tmp_path / "int8")
    expected = stored_bits(shapes, lambda out, inputs: 8 * out * inputs + 32 * out)
    check(loaded, records, folder, expected, storage_format="int-quantized", parameters=parameters)


def test_float_quantized_fp8_counts_fp8_weights_and_scales(make_llama, records, tmp_path):
    loaded = make_llama()
    parameters = parameter_count(loaded.model)
    shapes = block_linears(loaded.model)
    compress(loaded.model, Recipe.model_validate({"stages": [{"method": "fp8"}]}))
    folder = export(loaded, tmp_path / "fp8")
    expected = stored_bits(shapes, lambda out, inputs: 8 * out * inputs + 32 * out)
    check(
        loaded, records, folder, expected, storage_format="float-quantized", parameters=parameters
    )


@pytest.mark.parametrize(
    ("pattern", "storage_format"),
    [("unstructured", "sparse-bitmask"), ("2:4", "sparse-24-bitmask")],
)
def test_sparse_bitmask_counts_pruned_weights(
    make_llama, records, tmp_path, pattern, storage_format
):
    loaded = make_llama()
    parameters = parameter_count(loaded.model)
    shapes = block_linears(loaded.model)
    compress(
        loaded.model,
        Recipe.model_validate({"stages": [{"method": "magnitude", "pattern": pattern}]}),
    )
    nonzero = {
        name: int(torch.count_nonzero(loaded.model.get_submodule(name).weight)) for name in shapes
    }
    folder = export(loaded, tmp_path / "sparse")
    weights = sum(out * inputs for out, inputs in shapes.values())
    bits = 0
    for name, (out, inputs) in shapes.items():
        bits += out * math.ceil(inputs / 8) * 8  # the bitmask
        if pattern == "2:4":
            bits += 32 * out * inputs // 2 + 64 * 2  # 2 of every 4 values kept, the shape
        else:
            bits += 32 * nonzero[name] + 64 * 2 + 64 * out  # the values, shape, row offsets
    files = check(
        loaded,
        records,
        folder,
        bits / weights,
        storage_format=storage_format,
        parameters=parameters,
    )
    assert files["bits_per_weight"] < 20  # half the float32 values and a bit each


def test_an_untied_quantized_head_is_counted_once(make_llama, records, tmp_path):
    loaded = make_llama(tie=False)
    parameters = parameter_count(loaded.model)
    stage = {"method": "rtn", "bits": 8, "group_size": -1, "modules": ["Linear"]}
    compress(loaded.model, Recipe.model_validate({"stages": [stage]}))
    folder = export(loaded, tmp_path / "int8-head")
    files = size_of(loaded, loaded.model, records, folder)
    assert files["parameters"] == parameters
    # 8-bit codes packed 4 to a word, a float32 scale per row and the shape, in every Linear.
    assert 8 < files["bits_per_weight"] < 9
