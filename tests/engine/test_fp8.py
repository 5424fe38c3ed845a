"""FP8 on tiny models: E4M3 weights per channel, the compressed-tensors `float-quantized` layout,
and an honest runtime report where the device has no FP8 matrix multiply."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from tests.engine.test_w8a8 import IDS, outputs, save
from workers.compression import compress
from workers.compression.export import load_artifact, verify_export
from workers.compression.methods.fp8 import fp8_linear
from workers.compression.recipe import Fp8Config, Recipe
from workers.compression.runtime.fp8 import FP8, Fp8Linear


def test_fp8_weights_keep_relative_precision():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight[0] *= 1000  # an outlier row costs nothing relative to its own scale
    layer = fp8_linear(linear, dynamic_activations=False)
    dequantized = layer.weight.float() * layer.weight_scale
    relative = (dequantized - linear.weight).abs() / linear.weight.abs().clamp(min=1e-3)
    assert layer.weight.dtype == FP8
    assert relative[linear.weight.abs() > 1e-2].max() <= 2**-4 + 1e-6  # half of E4M3's step
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, dequantized, linear.bias))


@pytest.mark.parametrize("activations", ["none", "dynamic"])
def test_fp8_artifact_round_trip(make_llama, tmp_path, activations):
    loaded = make_llama()
    reference = outputs(loaded)
    summary = compress(loaded.model, Recipe(stages=[Fp8Config(activations=activations)])).stages[0]
    assert summary["quantized_layers"] == 14 and summary["mean_relative_weight_error"] < 0.05
    assert ((outputs(loaded) - reference).norm() / reference.norm()) < 0.05
    save(loaded, tmp_path / "artifact")

    quantization = json.loads((tmp_path / "artifact" / "config.json").read_text())[
        "quantization_config"
    ]
    (group,) = quantization["config_groups"].values()
    assert quantization["format"] == "float-quantized"
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert (group["input_activations"] is not None) is (activations == "dynamic")
    state = safetensors.torch.load_file(tmp_path / "artifact" / "model.safetensors")
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == FP8

    artifact = load_artifact(tmp_path / "artifact")
    assert all(isinstance(artifact.model.get_submodule(n), Fp8Linear) for n in summary["quantized"])
    runtime = artifact.model.slimformer_runtime
    assert runtime["kernels"] == {"float": 14}  # no FP8 matrix multiply on a CPU: said, not hidden
    assert "FP8 values computed in float" in next(iter(runtime["fallbacks"].values()))
    assert torch.equal(outputs(artifact), outputs(loaded))
    assert verify_export(tmp_path / "artifact", loaded.model, "causal-lm", IDS)["max_abs_diff"] == 0

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact").eval()
    torch.testing.assert_close(outputs(loaded, plain), outputs(loaded), rtol=1e-3, atol=1e-3)
