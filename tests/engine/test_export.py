"""save_model -> load_artifact on tiny models: same outputs, same bytes, the compressed-tensors
layout."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from workers.compression import compress
from workers.compression.export import (
    ExportVerificationError,
    load_artifact,
    save_model,
    update_metadata,
    verify_export,
)
from workers.compression.loading import UnsupportedModelError
from workers.compression.methods.dynamic_int8 import DynamicInt8Linear
from workers.compression.recipe import DynamicInt8Config, Recipe

RECIPE = {"stages": [{"method": "dynamic_int8"}]}
METRICS = {"baseline": {"size_bytes": 100}, "compressed": {"size_bytes": 40}, "settings": {"x": 1}}
INPUTS = {"model_sha256": "ab" * 32}


def save(loaded, folder):
    return save_model(
        loaded,
        loaded.model,
        folder,
        recipe=RECIPE,
        metrics=METRICS,
        inputs=INPUTS,
        versions={"torch": "pinned"},
    )


def quantize(loaded, **config):
    compress(loaded.model, Recipe(stages=[DynamicInt8Config(**config)]))


def test_int8_llama_round_trip_gives_identical_logits(make_llama, tmp_path):
    loaded = make_llama()
    quantize(loaded, modules=["Linear"])  # lm_head too: it must be untied from the embedding
    files = save(loaded, tmp_path / "artifact")
    assert {path.name for path in files} >= {
        "model.safetensors",
        "config.json",
        "README.md",
        "slimformer.json",
        "tokenizer.json",
        "generation_config.json",
    }

    artifact = load_artifact(tmp_path / "artifact")
    assert artifact.task == "causal-lm" and artifact.architecture == "LlamaForCausalLM"
    assert len([m for m in artifact.model.modules() if isinstance(m, DynamicInt8Linear)]) == 15
    ids = torch.randint(6, 128, (2, 12))
    with torch.inference_mode():
        assert torch.equal(loaded.model(input_ids=ids).logits, artifact.model(input_ids=ids).logits)
    report = verify_export(tmp_path / "artifact", loaded.model, "causal-lm", ids)
    assert report["max_abs_diff"] == 0.0 and report["loaded_as"] == "LlamaForCausalLM"


def test_int8_layout_is_compressed_tensors(llama, tmp_path):
    quantize(llama)
    save(llama, tmp_path / "artifact")
    with safe_open(tmp_path / "artifact" / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        q = weights.get_tensor("model.layers.0.mlp.down_proj.weight")
        scale = weights.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert q.dtype == torch.int8 and q.shape == (32, 64)
    assert scale.dtype == torch.float32 and scale.shape == (32, 1)
    assert not any(
        "zero_point" in key or "packed" in key for key in keys
    )  # symmetric: no zero points
    assert "lm_head.weight" not in keys  # tied to the embedding and left in float: stored once

    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == "int-quantized"
    assert quantization["ignore"] == ["lm_head"]
    (group,) = quantization["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert (
        group["weights"].items()
        >= {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "channel",
            "dynamic": False,
        }.items()
    )
    assert (
        group["input_activations"].items()
        >= {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        }.items()
    )
    assert config["tie_word_embeddings"] is True

    metadata = json.loads((tmp_path / "artifact" / "slimformer.json").read_text())
    assert metadata["recipe"] == RECIPE and metadata["inputs"] == INPUTS
    assert metadata["metrics"] == METRICS and metadata["versions"] == {"torch": "pinned"}
    assert set(metadata["files"]) >= {"model.safetensors", "config.json", "README.md"}
    card = (tmp_path / "artifact" / "README.md").read_text()
    assert "| size_bytes | 100 | 40 |" in card and "load_artifact" in card


def test_dense_and_bert_artifacts_load_with_transformers(bert, tmp_path):
    save(bert, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["BertModel"]
    dense = load_artifact(tmp_path / "dense", device="cpu")
    ids = torch.randint(6, 128, (1, 9))
    with torch.inference_mode():
        expected = bert.model(input_ids=ids).last_hidden_state
        assert torch.equal(dense.model(input_ids=ids).last_hidden_state, expected)

    quantize(bert, per_channel=False)
    save(bert, tmp_path / "int8")
    report = verify_export(tmp_path / "int8", bert.model, "feature-extraction", ids)
    assert report["max_abs_diff"] == 0.0
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("encoder.layer.0.attention.self.query.weight_scale").shape == (1,)


def test_saving_twice_gives_identical_bytes(llama, tmp_path):
    quantize(llama)
    first = save(llama, tmp_path / "one")
    second = save(llama, tmp_path / "two")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_updating_metadata_equals_saving_with_the_final_metrics(llama, tmp_path):
    quantize(llama)
    final = save(llama, tmp_path / "final")
    save_model(
        llama,
        llama.model,
        tmp_path / "early",
        recipe=RECIPE,
        metrics={},
        inputs=INPUTS,
        versions={"torch": "pinned"},
    )
    update_metadata(llama, tmp_path / "early", recipe=RECIPE, metrics=METRICS, inputs=INPUTS)
    early = sorted(p for p in (tmp_path / "early").rglob("*") if p.is_file())
    assert [p.name for p in early] == [p.name for p in final]
    for a, b in zip(early, final, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_tampered_artifact_fails_verification(llama, tmp_path):
    quantize(llama)
    save(llama, tmp_path / "artifact")
    path = tmp_path / "artifact" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight_scale"] *= 2
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ExportVerificationError):
        verify_export(
            tmp_path / "artifact", llama.model, "causal-lm", torch.randint(6, 128, (1, 8))
        )


def test_an_existing_folder_is_never_overwritten(llama, tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OSError):
        save(llama, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no temp folder left behind


def test_unknown_quantization_formats_are_refused(llama, tmp_path):
    save(llama, tmp_path / "artifact")
    config_path = tmp_path / "artifact" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="bitsandbytes"):
        load_artifact(tmp_path / "artifact")


def test_int8_artifacts_refuse_a_gpu_device(llama, tmp_path):
    quantize(llama)
    save(llama, tmp_path / "artifact")
    with pytest.raises(ValueError, match="CPU"):
        load_artifact(tmp_path / "artifact", device="cuda")
    assert isinstance(load_artifact(tmp_path / "artifact").model.lm_head, nn.Linear)
