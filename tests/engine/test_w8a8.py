"""SmoothQuant and W8A8 on tiny models: exact rescaling, integer products, the compressed-tensors
`int-quantized` layout with static and dynamic activations, resume."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from app.storage import LocalStore
from tests.engine.test_quant import Killed
from workers.checkpoints import StorageBlockCheckpoint
from workers.compression import compress
from workers.compression.calibration import run_blockwise
from workers.compression.export import load_artifact, save_model, verify_export
from workers.compression.methods.smoothquant import input_channel_max
from workers.compression.methods.w8a8 import StaticW8A8Handler, w8a8_linear
from workers.compression.recipe import Recipe, SmoothQuantConfig
from workers.compression.registry import StageContext, method_for
from workers.compression.runtime.int8 import W8A8Linear, activation_scale, int8_matmul
from workers.compression.smoothing import block_balances

IDS = torch.randint(6, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def calibration(n: int = 8, length: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(6, 128, (1, length), generator=generator) for _ in range(n)]


def recipe(*stages: dict) -> Recipe:
    return Recipe.model_validate({"stages": list(stages)})


def smooth(model: nn.Module, samples: list[torch.Tensor], **config) -> dict:
    """The smoothquant stage alone (a recipe must follow it with a quantizing stage)."""
    stage = SmoothQuantConfig(**config)
    context = StageContext("smoothquant", samples, 0, 1, progress=None)
    return method_for(stage)(model, stage, context)


def outputs(loaded, model=None):
    model = model if model is not None else loaded.model
    with torch.inference_mode():
        if loaded.task == "causal-lm":
            return model(input_ids=IDS).logits
        return model(input_ids=IDS).last_hidden_state


def save(loaded, folder):
    return save_model(
        loaded, loaded.model, folder, recipe={}, metrics={}, inputs={}, versions={"torch": "x"}
    )


def with_outlier(loaded, channel: int = 3, factor: float = 40.0):
    """Give every block's post-attention norm one large channel, as real LLMs have."""
    for name, module in loaded.model.named_modules():
        if name.endswith("post_attention_layernorm"):
            with torch.no_grad():
                module.weight[channel] *= factor
    return loaded


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothquant_keeps_the_function_of_a_gqa_llama(make_llama, alpha):
    loaded = with_outlier(make_llama())
    before = outputs(loaded)
    summary = smooth(loaded.model, calibration(), alpha=alpha)
    torch.testing.assert_close(outputs(loaded), before, rtol=1e-4, atol=1e-4)
    # Four pairs per block: norm → q/k/v, v → o (grouped: 4 query heads share 2 kv heads),
    # norm → gate/up, up → down.
    assert summary["smoothed"] == 8
    assert summary["calibration_tokens"] == 8 * 16


def test_smoothquant_flattens_the_outlier_channel(make_llama):
    loaded = with_outlier(make_llama())
    block = loaded.model.model.layers[0]
    samples = calibration()

    def up_input_max() -> torch.Tensor:
        maxima = {}

        def observe(index, name, block, inputs):  # noqa: ANN001, ANN202
            if index == 0:
                maxima.update(input_channel_max(block, {"up": block.mlp.up_proj}, inputs))
            return {}

        run_blockwise(loaded.model, samples, observe, progress=lambda *a: None)
        return maxima["up"]

    before = up_input_max()
    smooth(loaded.model, samples)
    after = up_input_max()
    # The outlier channel was 40x its neighbours; after smoothing the spread is its square root.
    spread = lambda m: (m.max() / m.median()).item()  # noqa: E731
    assert spread(after) < spread(before) / 3
    assert block.post_attention_layernorm.weight[3] < 40 * 0.5


def test_smoothquant_on_bert_rescales_value_into_output_only(bert):
    before = outputs(bert)
    balances = block_balances(bert.model.encoder.layer[0], bert.model.config)
    assert [(b.producer, b.consumers) for b in balances] == [
        ("attention.self.value", ("attention.output.dense",))
    ]
    assert smooth(bert.model, calibration())["smoothed"] == 2
    torch.testing.assert_close(outputs(bert), before, rtol=1e-4, atol=1e-4)


def test_w8a8_linear_is_the_integer_product():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    for input_scale in (activation_scale(x.abs().amax()).reshape(1), None):
        layer = w8a8_linear(linear, input_scale)
        scale = (
            activation_scale(x.abs().amax(dim=-1, keepdim=True))
            if input_scale is None
            else input_scale
        )
        qx = torch.round(x / scale).clamp(-128, 127)
        expected = (qx * scale) @ (layer.weight.float() * layer.weight_scale).T + linear.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert (layer(x) - linear(x)).abs().max() < 0.05


def test_int8_matmul_is_exact():
    generator = torch.Generator().manual_seed(0)
    qx = torch.randint(-128, 128, (33, 96), generator=generator, dtype=torch.int8)
    qw = torch.randint(-128, 128, (40, 96), generator=generator, dtype=torch.int8)
    assert torch.equal(int8_matmul(qx, qw), (qx.long() @ qw.long().T).int())


def test_static_kernels_agree():
    """fbgemm's static int8 kernel (CPUs with VNNI) and torch._int_mm give the same numbers."""
    torch.manual_seed(0)
    x = torch.randn(17, 64) * 3
    layer = w8a8_linear(nn.Linear(64, 32), activation_scale(x.abs().amax()).reshape(1))
    generic = torch.round(x / layer.input_scale).clamp(-128, 127).to(torch.int8)
    expected = (
        int8_matmul(generic, layer.weight).float()
        * (layer.input_scale * layer.weight_scale.reshape(1, -1))
        + layer.bias
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_w8a8_artifact_round_trip(make_llama, tmp_path, activations):
    loaded = with_outlier(make_llama())
    compress(
        loaded.model,
        recipe({"method": "smoothquant"}, {"method": "w8a8", "activations": activations}),
        calibration(),
    )
    layers = [m for m in loaded.model.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 14 and all(
        layer.dynamic == (activations == "dynamic") for layer in layers
    )
    save(loaded, tmp_path / "artifact")

    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format"] == "int-quantized"
    (group,) = quantization["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["dynamic"] is (activations == "dynamic")
    assert group["input_activations"]["strategy"] == (
        "token" if activations == "dynamic" else "tensor"
    )
    state = safetensors.torch.load_file(tmp_path / "artifact" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert state[f"{name}.weight"].dtype == torch.int8
    assert (f"{name}.input_scale" in state) is (activations == "static")

    artifact = load_artifact(tmp_path / "artifact")
    assert artifact.model.slimformer_runtime["kernels"] == {f"w8a8-{activations}": 14}
    assert torch.equal(outputs(artifact), outputs(loaded))
    report = verify_export(tmp_path / "artifact", loaded.model, "causal-lm", IDS)
    assert report["max_abs_diff"] == 0

    # transformers + compressed-tensors quantize activations the same way, in float arithmetic.
    # Where an activation sits at a rounding boundary, the two float paths may round it to
    # neighbouring codes (CPU-dependent: on an AMD EPYC, 3% of the logits moved by <= 1.3e-3, one
    # code of one activation); a different convention (scale, zero point, clamping) moves them all.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact").eval()
    difference = (outputs(loaded, plain) - outputs(loaded)).abs()
    assert difference.max() <= 1e-2
    assert (difference > 1e-4).float().mean() <= 0.05


def test_bert_static_w8a8_loads_in_transformers(bert, tmp_path):
    compress(bert.model, recipe({"method": "w8a8", "activations": "static"}), calibration())
    save(bert, tmp_path / "artifact")
    plain = AutoModel.from_pretrained(tmp_path / "artifact").eval()
    torch.testing.assert_close(outputs(bert, plain), outputs(bert), rtol=1e-4, atol=1e-4)
    artifact = load_artifact(tmp_path / "artifact")
    assert torch.equal(outputs(artifact), outputs(bert))


def test_static_w8a8_resumes_bit_for_bit(make_llama, tmp_path):
    samples = calibration()

    def targeted(model):
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]

    reference = make_llama().model
    run_blockwise(
        reference, samples, StaticW8A8Handler(targeted(reference)), progress=lambda *a: None
    )

    checkpoint = StorageBlockCheckpoint(LocalStore(tmp_path / "store"), "checkpoints/w8a8")
    killed = make_llama().model
    handler = StaticW8A8Handler(targeted(killed))

    def dies_in_block_1(index, name, block, inputs):  # noqa: ANN001, ANN202
        if index == 1:
            raise Killed
        return handler(index, name, block, inputs)

    with pytest.raises(Killed):
        run_blockwise(
            killed, samples, dies_in_block_1, progress=lambda *a: None, checkpoint=checkpoint
        )

    resumed = make_llama().model
    handler = StaticW8A8Handler(targeted(resumed))
    run_blockwise(
        resumed,
        samples,
        handler,
        progress=lambda *a: None,
        checkpoint=checkpoint,
        restore=handler.restore,
    )
    expected, actual = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"method": "smoothquant"}], "follow it with w8a8"),
        (
            [{"method": "w8a8"}, {"method": "smoothquant"}, {"method": "w8a8"}],
            "must come before w8a8",
        ),
        ([{"method": "rtn"}, {"method": "w8a8"}], "cannot be combined"),
        ([{"method": "w8a8", "activations": "per-token"}], "activations"),
    ],
)
def test_invalid_recipes_are_refused(stages, message):
    with pytest.raises(ValidationError, match=message):
        recipe(*stages)


def test_static_w8a8_needs_calibration_and_dynamic_does_not():
    assert recipe({"method": "w8a8", "activations": "static"}).needs_calibration
    assert recipe({"method": "w8a8"}).stages[0].activations == "dynamic"  # the default
    assert not recipe({"method": "w8a8"}).needs_calibration
    assert not recipe({"method": "w8a8", "activations": "dynamic"}).needs_calibration
    assert recipe(
        {"method": "smoothquant"}, {"method": "w8a8", "activations": "dynamic"}
    ).needs_calibration


def test_static_w8a8_outside_the_blocks_is_refused(llama):
    with pytest.raises(ValueError, match="lm_head are outside"):
        compress(
            llama.model,
            recipe({"method": "w8a8", "activations": "static", "modules": ["Linear"]}),
            calibration(),
        )
