"""AWQ on tiny models: better than round-to-nearest where activations have outlier channels,
exported as `pack-quantized` that transformers loads exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.test_w8a8 import IDS, calibration, outputs, save, with_outlier
from workers.compression import compress
from workers.compression.export import load_artifact, verify_export
from workers.compression.methods.awq import CLIP_RATIOS, output_error
from workers.compression.quant import ATTRIBUTE, dequantize
from workers.compression.recipe import AwqConfig, Recipe, RtnConfig


def error_against(reference: torch.Tensor, loaded) -> float:
    return ((outputs(loaded) - reference).norm() / reference.norm()).item()


def test_awq_beats_round_to_nearest_with_outlier_channels(make_llama):
    reference = outputs(with_outlier(make_llama()))

    rtn = with_outlier(make_llama())
    compress(rtn.model, Recipe(stages=[RtnConfig(bits=3, group_size=16)]))

    awq = with_outlier(make_llama())
    summary = compress(
        awq.model, Recipe(stages=[AwqConfig(bits=3, group_size=16)]), calibration(16, 24)
    ).stages[0]

    assert summary["quantized_layers"] == 14 and summary["scaled_pairs"] == 8
    assert 0 <= summary["mean_alpha"] < 1
    assert error_against(reference, awq) < 0.8 * error_against(reference, rtn)
    for layer in summary["quantized"]:
        module = awq.model.get_submodule(layer)
        assert torch.equal(dequantize(getattr(module, ATTRIBUTE)), module.weight)


def test_awq_artifact_loads_in_transformers_exactly(make_llama, tmp_path):
    loaded = with_outlier(make_llama())
    compress(loaded.model, Recipe(stages=[AwqConfig(group_size=16)]), calibration())
    save(loaded, tmp_path / "artifact")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact").eval()
    assert torch.equal(outputs(loaded, plain), outputs(loaded))
    report = verify_export(tmp_path / "artifact", loaded.model, "causal-lm", IDS)
    assert report["weights_exact_layers"] == 14
    assert load_artifact(tmp_path / "artifact").model.slimformer_runtime["kernels"]


def test_output_error_is_the_squared_output_change():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=generator)
    delta = torch.randn(4, 8, generator=generator)
    hessian = x.T @ x
    assert output_error(delta, hessian).item() == pytest.approx((x @ delta.T).pow(2).sum().item())


def test_clip_grid_is_the_papers():
    assert (
        CLIP_RATIOS[0] == 1.0 and CLIP_RATIOS[-1] == pytest.approx(0.55) and len(CLIP_RATIOS) == 10
    )


def test_awq_refuses_layers_outside_the_blocks(llama):
    with pytest.raises(ValueError, match="lm_head are outside"):
        compress(
            llama.model,
            Recipe(stages=[AwqConfig(group_size=16, modules=["Linear"])]),
            calibration(),
        )
