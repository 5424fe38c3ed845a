"""Structured pruning (whole heads and FFN channels) on tiny random Llama and BERT models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from app.storage import LocalStore
from tests.engine.conftest import VOCAB_SIZE, tiny_llama, word_tokenizer
from tests.engine.test_quant import Killed, calibration, state
from workers.checkpoints import StorageBlockCheckpoint
from workers.compression import compress
from workers.compression.evaluation import parameter_count
from workers.compression.export import save_model, verify_export
from workers.compression.loading import LoadedModel
from workers.compression.recipe import Recipe, RtnConfig, StructuredConfig

INPUTS = {"model": "tiny"}


def ids() -> torch.Tensor:
    return torch.randint(6, VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(7))


def run(model: nn.Module, **fields) -> dict:  # noqa: ANN003
    return compress(model, Recipe(stages=[StructuredConfig(**fields)]), calibration()).stages[0]


def llama_with(*, num_attention_heads: int, num_key_value_heads: int, hidden_size: int = 32):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def head_columns(heads: list[int], head_dim: int) -> list[int]:
    return [head * head_dim + i for head in heads for i in range(head_dim)]


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of `original` the rows of `pruned` are, by exact equality."""
    return [int((original == row).all(1).nonzero()) for row in pruned]


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=ids(), use_cache=False).logits


# --- the units the activation criterion removes, and that removing them is exact ---


def test_ffn_channels_that_contribute_nothing_are_removed_and_nothing_changes(llama):
    model = llama.model
    dead = {0: [3, 17, 40, 63], 1: [0, 5, 6, 50]}
    with torch.no_grad():
        for index, channels in dead.items():
            model.model.layers[index].mlp.down_proj.weight[:, channels] = 0
    before = logits(model)
    originals = [layer.mlp.up_proj.weight.clone() for layer in model.model.layers]

    summary = run(model, ffn_channels=4 / 64)

    assert summary["ffn_channels"] == {"before": 64, "after": 60}
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (60, 32)
        assert mlp.down_proj.weight.shape == (32, 60) and mlp.intermediate_size == 60
        expected = [c for c in range(64) if c not in dead[index]]
        assert kept_rows(originals[index], mlp.up_proj.weight) == expected
    assert model.config.intermediate_size == 60
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_a_kv_group_that_contributes_nothing_is_removed_with_its_query_heads(llama):
    model = llama.model  # 4 query heads, 2 k/v heads: query heads 2g and 2g+1 use k/v head g
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, head_columns([0, 1], 8)] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, head_columns([2, 3], 8)] = 0
    before = logits(model)
    originals = [layer.self_attn.q_proj.weight.clone() for layer in model.model.layers]

    summary = run(model, attention_heads=0.5)

    assert summary["removed_kv_groups"] == [[0], [1]]
    assert summary["attention_heads"] == {"before": 4, "after": 2}
    assert summary["kv_heads"] == {"before": 2, "after": 1}
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (16, 32) and attention.o_proj.weight.shape == (
            32,
            16,
        )
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (8, 32)
        assert attention.num_key_value_groups == 2 and attention.head_dim == 8
        kept_heads = [2, 3] if index == 0 else [0, 1]
        assert kept_rows(originals[index], attention.q_proj.weight) == head_columns(kept_heads, 8)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


# --- magnitude: pruned = the original with the removed units masked ---


@pytest.mark.parametrize("num_key_value_heads", [2, 4])  # grouped-query and plain attention
def test_pruned_model_equals_the_original_with_the_removed_units_masked(num_key_value_heads):
    model = llama_with(num_attention_heads=4, num_key_value_heads=num_key_value_heads)
    reference = llama_with(num_attention_heads=4, num_key_value_heads=num_key_value_heads)
    originals = state(model)

    summary = run(model, attention_heads=0.5, ffn_channels=0.25, criterion="magnitude")

    group = 4 // num_key_value_heads
    assert summary["attention_heads"]["after"] == 2
    assert summary["kv_heads"] == {"before": num_key_value_heads, "after": num_key_value_heads // 2}
    assert summary["calibration_samples"] == 0
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            gate = originals[prefix + "mlp.gate_proj.weight"]
            up = originals[prefix + "mlp.up_proj.weight"]
            down = originals[prefix + "mlp.down_proj.weight"]
            kept = kept_rows(up, layer.mlp.up_proj.weight)
            # The channels kept are those with the largest L2 norm of all their weights.
            norms = (gate.square().sum(1) + up.square().sum(1) + down.square().sum(0)).sqrt()
            assert sorted(kept) == sorted(norms.argsort(descending=True)[:48].tolist())
            removed_heads = [
                g * group + r for g in summary["removed_kv_groups"][index] for r in range(group)
            ]
            masked = reference.model.layers[index]
            masked.self_attn.o_proj.weight[:, head_columns(removed_heads, 8)] = 0
            masked.mlp.down_proj.weight[:, sorted(set(range(64)) - set(kept))] = 0
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


def test_magnitude_and_activation_both_prune_and_differ_in_what_they_keep():
    kept = {}
    for criterion in ("magnitude", "activation"):
        model = tiny_llama().model
        original = model.model.layers[0].mlp.up_proj.weight.clone()
        summary = run(model, ffn_channels=0.5, criterion=criterion)
        assert summary["criterion"] == criterion
        assert model.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
        kept[criterion] = kept_rows(original, model.model.layers[0].mlp.up_proj.weight)
        assert torch.isfinite(logits(model)).all()
    assert summary["calibration_samples"] == 8 and summary["calibration_tokens"] == 8 * 24
    assert kept["magnitude"] != kept["activation"]


# --- export: plain transformers loads the smaller model and computes the same ---


def test_export_loads_in_plain_transformers_with_the_same_logits(llama, tmp_path: Path):
    model = llama.model
    summary = run(model, attention_heads=0.5, ffn_channels=0.25)
    assert json.loads(json.dumps(summary)) == summary  # stored with the job as JSON
    assert summary["parameters"]["after"] == parameter_count(model)
    removed_per_layer = (
        2 * (8 * 32 + 32 * 8)  # one k/v group: its 2 query heads' q rows and o columns
        + 2 * 8 * 32  # its k and v heads
        + 16 * 3 * 32  # 16 FFN channels: gate and up rows, down column
    )
    assert summary["parameters"]["before"] - summary["parameters"]["after"] == 2 * removed_per_layer
    folder = tmp_path / "pruned"
    save_model(llama, model, folder, recipe={}, metrics={}, inputs=INPUTS)

    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 1
    assert config["head_dim"] == 8 and config["intermediate_size"] == 48
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.model.layers[1].mlp.down_proj.weight.shape == (32, 48)
    assert loaded.model.layers[1].self_attn.k_proj.weight.shape == (8, 32)
    assert parameter_count(loaded) == summary["parameters"]["after"]
    assert torch.equal(logits(loaded), logits(model))
    assert verify_export(folder, model, "causal-lm", ids()[:1])["max_abs_diff"] == 0


def test_bert_prunes_ffn_channels_with_their_biases_and_exports(bert, tmp_path: Path):
    model = bert.model
    layer = model.encoder.layer[0]
    dense, bias = layer.intermediate.dense.weight.clone(), layer.intermediate.dense.bias.clone()
    output_bias = layer.output.dense.bias.clone()

    summary = run(model, ffn_channels=0.5)

    assert summary["ffn_channels"] == {"before": 64, "after": 32}
    assert summary["attention_heads"] == {"before": 4, "after": 4}
    layer = model.encoder.layer[0]
    kept = kept_rows(dense, layer.intermediate.dense.weight)
    assert torch.equal(layer.intermediate.dense.bias, bias[kept])
    assert layer.output.dense.weight.shape == (32, 32)
    assert torch.equal(layer.output.dense.bias, output_bias)
    assert model.config.intermediate_size == 32

    folder = tmp_path / "bert"
    save_model(bert, model, folder, recipe={}, metrics={}, inputs=INPUTS)
    loaded = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(input_ids=ids()).last_hidden_state
        assert torch.equal(loaded(input_ids=ids()).last_hidden_state, expected)


def test_stages_compose_a_second_structured_stage_and_a_quantizer(llama):
    model = llama.model
    recipe = Recipe(
        stages=[
            StructuredConfig(ffn_channels=0.5),
            StructuredConfig(ffn_channels=0.5, attention_heads=0.5, criterion="magnitude"),
            RtnConfig(group_size=16),  # divides the pruned FFN width, 16
        ]
    )
    stages = compress(model, recipe, calibration()).stages
    assert stages[1]["ffn_channels"] == {"before": 32, "after": 16}
    assert stages[2]["quantized_layers"] == 14
    assert model.model.layers[0].mlp.down_proj.in_features == 16
    assert torch.isfinite(logits(model)).all()


# --- resume: a run killed after block 0 continues from its checkpoint to the same model ---


def test_killed_run_resumes_from_its_checkpoint_to_the_same_model(make_llama, tmp_path: Path):
    recipe = Recipe(stages=[StructuredConfig(attention_heads=0.5, ffn_channels=0.25)])
    reference = make_llama().model
    uninterrupted = compress(reference, recipe, calibration()).stages[0]

    store = LocalStore(tmp_path / "store")

    def checkpoints(stage_index: int) -> StorageBlockCheckpoint:
        return StorageBlockCheckpoint(store, f"checkpoints/{stage_index}")

    def dies_after_block_0(update) -> None:  # noqa: ANN001
        if update.step == 1:
            raise Killed

    with pytest.raises(Killed):
        compress(
            make_llama().model,
            recipe,
            calibration(),
            progress=dies_after_block_0,
            checkpoints=checkpoints,
        )
    steps = []
    resumed = make_llama().model
    stage = compress(
        resumed,
        recipe,
        calibration(),
        progress=lambda update: steps.append(update.step),
        checkpoints=checkpoints,
    ).stages[0]
    assert steps == [2]  # only block 1 ran again
    assert stage["removed_kv_groups"] == uninterrupted["removed_kv_groups"]
    expected, actual = state(reference), state(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


# --- requests that cannot apply are refused before anything changes ---


def refused(model: nn.Module, match: str, **fields) -> None:  # noqa: ANN003
    before = state(model)
    with pytest.raises(ValueError, match=match):
        run(model, **fields)
    after = state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_bert_heads_are_refused_because_bert_derives_head_size_from_the_head_count(bert):
    refused(bert.model, "BERT derives its head size", attention_heads=0.25, ffn_channels=0.5)


def test_unsupported_architecture_names_the_supported_ones():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4))
    refused(gpt2.eval(), r"supports bert, llama .*'gpt2'", ffn_channels=0.5)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"attention_heads": 0.9}, "would remove all 2 key/value head groups"),
        (
            {"ffn_channels": 0.001},
            "removes none; the smallest fraction that removes one is 0.00781",
        ),
        (
            {"ffn_channels": 0.5, "ignore": ["down_proj"]},
            "cannot leave model.layers.0.mlp.down_proj",
        ),
        ({"attention_heads": 0.5, "modules": ["mlp.*"]}, "cannot leave model.layers.0.self_attn"),
    ],
)
def test_removing_everything_nothing_or_leaving_layers_out_is_refused(llama, fields, match):
    refused(llama.model, match, **fields)


def test_head_counts_that_do_not_divide_hidden_size_are_refused_with_the_ones_that_work():
    model = llama_with(num_attention_heads=6, num_key_value_heads=6, hidden_size=24)
    refused(
        model, "keeps 5 heads.*fractions that work: 0.333, 0.5, 0.667, 0.833", attention_heads=0.17
    )


def test_activation_needs_calibration(llama):
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(llama.model, Recipe(stages=[StructuredConfig(ffn_channels=0.5)]), None)


def test_untied_lm_head_is_left_alone_and_exported(tmp_path: Path):
    loaded = LoadedModel(
        tiny_llama(tie=False).model, word_tokenizer(), "causal-lm", "LlamaForCausalLM", Path("t")
    )
    run(loaded.model, ffn_channels=0.75, criterion="magnitude")
    save_model(loaded, loaded.model, tmp_path / "untied", recipe={}, metrics={}, inputs=INPUTS)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert reloaded.config.intermediate_size == 16
    assert torch.equal(logits(reloaded), logits(loaded.model))
