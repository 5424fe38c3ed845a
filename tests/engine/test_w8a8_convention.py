"""Static-activation W8A8 computes what compressed-tensors and vLLM compute, layer by layer.

The reference here is written from their documented math, in plain torch (float64), reading the
artifact's safetensors directly: per layer input x, codes q_x = clamp(round_half_even(x / s_x) (in float32),
-128, 127) with the stored `input_scale` s_x (compressed-tensors `_quantize`: `x / scale`,
`torch.round`, the int8 range [-2^7, 2^7 - 1]; vLLM's `static_scaled_int8_quant`: `x / scale`,
round to nearest even, saturate to int8), weights q_w · `weight_scale`, y = (q_x s_x)(q_w s_w)ᵀ + b.

Why per layer, not end to end: static rounding makes the whole model discontinuous in its input.
On a SmolLM2 smoothquant + static artifact (bench.vllm_artifacts), scaling the input embeddings by
(1 + 1e-6 · noise) moves perplexity on 255 tokens by up to ±1.6% (mean |Δ logprob| 0.15), so
runtimes whose float sums differ in order (transformers' fake-quantized float matmul, our int8
kernels, vLLM's oneDNN) disagree end to end by that much while computing the same function. Fed
the same input, each layer must agree to float rounding.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
from workers.compression.export import load_artifact, save_model
from workers.compression.loading import load_model
from workers.compression.recipe import Recipe
from workers.compression.runtime import int8
from workers.compression.runtime.int8 import W8A8Linear

pytestmark = pytest.mark.real_model


def reference_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """compressed-tensors / vLLM static int8 W8A8, from the stored tensors: the codes from a
    float32 division (both divide in float32), the rest in float64."""
    scale = tensors[f"{name}.input_scale"].float().reshape(())
    codes = torch.clamp(torch.round(x.float() / scale), -128, 127).double()  # half to even
    scale = scale.double()
    weight = tensors[f"{name}.weight"].double() * tensors[f"{name}.weight_scale"].double()
    y = (codes * scale) @ weight.t()
    bias = tensors.get(f"{name}.bias")
    return y if bias is None else y + bias.double()


def test_static_w8a8_layers_compute_compressed_tensors_convention(cache_dir, tmp_path):
    """Both our CPU paths: fbgemm's int8 GEMM (VNNI CPUs) and torch._int_mm."""
    loaded = load_model(builtin_model_folder("all-MiniLM-L6-v2", cache_dir), device="cpu")
    sentences = [
        json.loads(line)["text"] for line in builtin_dataset_jsonl("lee-sentences").splitlines()
    ]
    calibration = calibration_batches(
        sentences, loaded.tokenizer, num_samples=4, seq_len=64, seed=0
    )
    recipe = Recipe.model_validate({"stages": [{"method": "w8a8", "activations": "static"}]})
    compress(loaded.model, recipe, calibration)
    save_model(loaded, loaded.model, tmp_path / "w8a8", recipe={}, metrics={}, inputs={})
    tensors = safetensors.torch.load_file(tmp_path / "w8a8" / "model.safetensors")

    runtime = load_artifact(tmp_path / "w8a8", device="cpu").model
    layers = {n: m for n, m in runtime.named_modules() if isinstance(m, W8A8Linear)}
    assert len(layers) == 36 and all(not m.dynamic for m in layers.values())
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach()))
        for n, m in layers.items()
    ]
    # Text beyond the calibration data, so some inputs exceed the calibrated range (clamping).
    batch = loaded.tokenizer(sentences[40:56], return_tensors="pt", padding=True)
    with torch.no_grad():
        runtime(**batch)
    for hook in hooks:
        hook.remove()
    original = int8.FULL_RANGE_ACTIVATIONS
    clamped = 0
    try:
        for fbgemm in {original, False}:  # fbgemm only where the CPU has VNNI
            int8.FULL_RANGE_ACTIVATIONS = fbgemm
            for name, layer in layers.items():
                x = inputs[name]
                with torch.no_grad():
                    ours = layer(x).double()
                expected = reference_linear(x, tensors, name)
                # Float rounding of the rescale only: one flipped code would cost s_x · |w| ≫ this.
                tolerance = 1e-5 * expected.abs().max().item() + 1e-6
                assert (ours - expected).abs().max().item() <= tolerance, (name, fbgemm)
                clamped += int((x.abs() / layer.input_scale > 127.5).sum())
    finally:
        int8.FULL_RANGE_ACTIVATIONS = original
    assert clamped > 0  # the clamp was exercised
