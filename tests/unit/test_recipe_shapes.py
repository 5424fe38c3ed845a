"""The torch-free shape bookkeeping the API uses to check a pipeline at submission."""

from __future__ import annotations

from workers.compression.recipe import RtnConfig, StructuredConfig, shapes_after


def test_structured_narrows_the_ffn_layers_only() -> None:
    llama = {
        "model.layers.0.self_attn.o_proj": [576, 576],
        "model.layers.0.mlp.gate_proj": [1536, 576],
        "model.layers.0.mlp.up_proj": [1536, 576],
        "model.layers.0.mlp.down_proj": [576, 1536],
        "lm_head": [49152, 576],
    }
    after = shapes_after(StructuredConfig(ffn_channels=0.25), llama)
    assert after["model.layers.0.mlp.gate_proj"] == [1152, 576]
    assert after["model.layers.0.mlp.up_proj"] == [1152, 576]
    assert after["model.layers.0.mlp.down_proj"] == [576, 1152]
    assert after["model.layers.0.self_attn.o_proj"] == [576, 576]
    assert after["lm_head"] == [49152, 576]

    bert = {
        "encoder.layer.3.attention.output.dense": [384, 384],
        "encoder.layer.3.intermediate.dense": [1536, 384],
        "encoder.layer.3.output.dense": [384, 1536],
    }
    after = shapes_after(StructuredConfig(ffn_channels=0.5), bert)
    assert after["encoder.layer.3.attention.output.dense"] == [384, 384]
    assert after["encoder.layer.3.intermediate.dense"] == [768, 384]
    assert after["encoder.layer.3.output.dense"] == [384, 768]


def test_other_stages_leave_the_shapes_alone() -> None:
    shapes = {"model.layers.0.mlp.down_proj": [576, 1536]}
    assert shapes_after(RtnConfig(), shapes) is shapes
    assert shapes_after(StructuredConfig(attention_heads=0.25), shapes) is shapes
