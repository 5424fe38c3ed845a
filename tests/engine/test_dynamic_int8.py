"""dynamic_int8 on tiny random models: which layers, what numbers, progress and cancellation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.compression import compress
from workers.compression.methods.dynamic_int8 import quantize_weight
from workers.compression.progress import ProgressUpdate
from workers.compression.recipe import DynamicInt8Config, Recipe
from workers.compression.runtime.int8 import (
    DynamicInt8Linear,
    int8_linear,
    int8_weight_and_scale,
)


def linear_names(model: nn.Module, kind: type) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, kind)]


def run(model: nn.Module, **config) -> dict:
    return compress(model, Recipe(stages=[DynamicInt8Config(**config)])).stages[0]


def test_quantize_weight_is_symmetric_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(8, 16) * torch.linspace(0.01, 3, 8).unsqueeze(1)
    weight[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(weight, per_channel=True)
    assert q.dtype == torch.int8 and scale.shape == (8, 1) and scale.dtype == torch.float32
    nonzero = [row for row in range(8) if row != 3]
    assert q[nonzero].abs().amax(dim=1).tolist() == [127] * 7  # each row's largest weight is exact
    assert q[3].abs().max() == 0
    assert ((q.float() * scale - weight).abs() <= scale / 2 + 1e-7).all()

    q, scale = quantize_weight(weight, per_channel=False)
    assert scale.shape == (1,) and q.abs().max() == 127


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_linear_holds_exactly_the_given_values(per_channel):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 40) * 0.05, torch.randn(24)
    q, scale = quantize_weight(weight, per_channel=per_channel)
    layer = int8_linear(q, scale, bias)
    stored_q, stored_scale = int8_weight_and_scale(layer)
    assert torch.equal(stored_q, q) and torch.equal(stored_scale, scale)
    assert torch.equal(layer.bias(), bias)
    x = torch.randn(3, 40)
    expected = x @ (q.float() * scale).T + bias
    assert ((layer(x) - expected).norm() / expected.norm()).item() < 0.02  # activation rounding


def test_default_quantizes_the_linears_inside_the_decoder_blocks(llama):
    model = llama.model
    ids = torch.randint(6, 128, (2, 10))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    float_linears = linear_names(model, nn.Linear)

    summary = run(model)

    block_linears = [name for name in float_linears if name.startswith("model.layers.")]
    assert len(block_linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert summary["quantized"] == block_linears
    assert summary["skipped"] == ["lm_head"]
    assert linear_names(model, DynamicInt8Linear) == block_linears
    assert isinstance(model.lm_head, nn.Linear)
    with torch.inference_mode():
        actual = model(input_ids=ids).logits
    relative_error = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < relative_error < 0.05


def test_default_skips_the_bert_pooler(bert):
    summary = run(bert.model)
    assert summary["quantized_layers"] == 12  # 2 layers x (query, key, value, 3 dense)
    assert summary["skipped"] == ["pooler.dense"]


def test_ignore_patterns_match_full_names_and_dotted_tails(llama):
    summary = run(llama.model, ignore=["down_proj", "model.layers.0.*"])
    assert summary["quantized"] == [
        f"model.layers.1.{part}"
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    ]
    assert "model.layers.1.mlp.down_proj" in summary["skipped"]
    assert isinstance(llama.model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_modules_replaces_the_default_selection(make_llama):
    everything = make_llama()
    summary = run(everything.model, modules=["Linear"])
    assert summary["quantized_layers"] == 15 and summary["skipped"] == []
    assert isinstance(everything.model.lm_head, DynamicInt8Linear)

    mlp_only = make_llama()
    summary = run(mlp_only.model, modules=["*.mlp.*"])
    assert summary["quantized_layers"] == 6
    assert all(".mlp." in name for name in summary["quantized"])


def test_per_tensor_scales(llama):
    run(llama.model, per_channel=False)
    weight = llama.model.model.layers[0].mlp.up_proj.weight()
    assert weight.qscheme() == torch.per_tensor_affine


def test_progress_reports_every_layer(llama):
    updates: list[ProgressUpdate] = []
    compress(llama.model, Recipe(stages=[DynamicInt8Config()]), progress=updates.append)
    assert [update.step for update in updates] == list(range(1, 15))
    assert {(u.stage, u.stage_index, u.num_stages, u.total_steps) for u in updates} == {
        ("dynamic_int8", 0, 1, 14)
    }
    assert updates[0].message == "quantized model.layers.0.self_attn.q_proj"


class Cancelled(Exception):
    pass


def test_a_raising_progress_callback_stops_the_run(llama):
    def cancel_at_third_layer(update: ProgressUpdate) -> None:
        if update.step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        compress(llama.model, Recipe(stages=[DynamicInt8Config()]), progress=cancel_at_third_layer)
    assert len(linear_names(llama.model, DynamicInt8Linear)) == 3  # nothing after the raise


def test_a_recipe_that_matches_nothing_is_an_error(llama):
    with pytest.raises(ValueError, match="matched no Linear"):
        run(llama.model, modules=["no_such_layer"])


def test_stages_run_in_order_and_report_their_config(llama):
    recipe = Recipe(
        stages=[DynamicInt8Config(modules=["*.mlp.*"]), DynamicInt8Config(per_channel=False)]
    )
    result = compress(llama.model, recipe)
    assert result.model is llama.model
    assert [stage["quantized_layers"] for stage in result.stages] == [6, 8]
    assert result.stages[1]["config"]["per_channel"] is False
    assert llama.model.model.layers[0].mlp.up_proj.weight().qscheme() == torch.per_channel_affine
    assert (
        llama.model.model.layers[0].self_attn.q_proj.weight().qscheme() == torch.per_tensor_affine
    )
