"""save_model -> load_artifact on tiny models: same outputs, same bytes, the compressed-tensors
layout; the two-phase write (write_draft -> verify -> publish) gives the same folder."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import yaml
from safetensors import safe_open
from torch import nn

from workers.compression import compress
from workers.compression.export import (
    ExportVerificationError,
    load_artifact,
    save_model,
    verify,
    verify_export,
    write_draft,
)
from workers.compression.formats import register_layout
from workers.compression.formats.int_quantized import IntQuantized
from workers.compression.loading import LoadedModel, UnsupportedModelError
from workers.compression.model_card import model_card
from workers.compression.recipe import DynamicInt8Config, Recipe, RtnConfig
from workers.compression.runtime.int8 import DynamicInt8Linear

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


def draft(loaded, folder):
    return write_draft(
        loaded, loaded.model, folder, recipe=RECIPE, inputs=INPUTS, versions={"torch": "pinned"}
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
    front, body = front_matter(card)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"slimformer", "compressed-tensors", "dynamic_int8", "int8"} <= set(front["tags"])
    assert "base_model" not in front and "license" not in front  # not known here
    assert "# LlamaForCausalLM (dynamic_int8), compressed with Slimformer" in body
    assert "| Size on disk | 100 B | 40 B | 0.40× |" in body
    assert "Int8 weights (one scale per output channel), activations quantized to int8" in body
    assert "`lm_head`): the output head, outside the repeated blocks" in body  # and why
    assert "load_artifact" in body and "from vllm import LLM" in body
    assert "Warning" not in body


def front_matter(card: str) -> tuple[dict, str]:
    """The card's YAML front matter, parsed, and the text after it."""
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_the_model_card_reads_like_one(llama, tmp_path):
    """A job's facts in words: the source's name and Hub id, a headline with its settings, each
    stage in a sentence, warnings when quality dropped a lot."""
    stages = [
        {"method": "structured", "ffn_channels": 0.25, "criterion": "magnitude"},
        {"method": "gptq", "bits": 4, "group_size": 64, "ignore": ["down_proj"]},
    ]
    metrics = {
        "baseline": {"size_bytes": 500e6, "perplexity": 20.0, "latency_ms_p50": 30.0},
        "compressed": {"size_bytes": 100e6, "perplexity": 23.0, "latency_ms_p50": 40.0},
        "settings": {
            "device": "cpu",
            "perplexity": {"windows": 4, "seq_len": 256, "stride": 256, "scored_tokens": 1020},
            "latency": {"batch_size": 1, "seq_len": 128, "runs": 5, "warmup": 1},
            "dataset_id": "dset_1",
        },
        "stages": [
            {},
            {"quantized_layers": 2, "calibration_samples": 8, "calibration_tokens": 512},
        ],
    }
    config = {
        "quantization_config": {
            "config_groups": {
                "group_0": {
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": 64,
                    },
                    "input_activations": None,
                    "targets": ["Linear"],
                }
            },
            "format": "pack-quantized",
            "ignore": ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
            "quant_method": "compressed-tensors",
        }
    }
    inputs = {
        "model_name": "SmolLM2-135M-Instruct",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
    }
    card = model_card(
        "LlamaForCausalLM",
        "causal-lm",
        config,
        recipe={"stages": stages},
        metrics=metrics,
        inputs=inputs,
        source={"license": "mit", "language": "en"},
    )
    front, body = front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["base_model_relation"] == "quantized"
    assert front["license"] == "apache-2.0"  # the registry's, over the source card's
    assert front["language"] == "en"
    assert {"gptq", "int4", "4-bit", "structured", "pruned"} <= set(front["tags"])
    assert body.startswith("\n# SmolLM2-135M-Instruct (structured + gptq), compressed with")
    assert "| Perplexity (lower is better) | 20 | 23 | +15.0% |" in body
    assert "| Latency, median (batch 1 × 128 tokens) | 30.0 ms | 40.0 ms | 1.33× |" in body
    assert "perplexity over 4 windows of 256 tokens" in body and "`dset_1`" in body
    assert "> **Warning:** perplexity rose by 15.0%" in body
    assert "> Note: this model ran slower than the original" in body
    assert "1. 25% of the FFN channels removed (scored by magnitude)" in body
    assert (
        "2. 4-bit weights in groups of 64 (GPTQ, largest inputs first, symmetric) in 2 Linear "
        "layers; activations stay float, calibrated on 8 samples of 64 tokens; left alone: "
        "`down_proj`." in body
    )
    assert "- 2 Linear layers (`model.layers.0.mlp.down_proj`" in body
    assert "the recipe's `ignore` names them" in body
    assert "- 1 Linear layer (`lm_head`): the output head" in body  # the default's reason

    encoder = model_card(
        "BertModel",
        "feature-extraction",
        {},
        recipe={"stages": [{"method": "magnitude"}]},
        metrics={"baseline": {"embedding_cosine": 1.0}, "compressed": {"embedding_cosine": 0.9}},
        inputs={},
        sentence_transformers=True,
    )
    front, body = front_matter(encoder)
    assert front["pipeline_tag"] == "sentence-similarity"
    assert front["library_name"] == "sentence-transformers"
    assert "> **Warning:** the embeddings' mean cosine to the original is 0.9000" in body
    assert "Every weight is float32" in body and "SentenceTransformer(" in body
    assert 'runner="pooling"' in body


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


def test_a_published_draft_is_the_folder_save_model_writes(llama, tmp_path):
    quantize(llama)
    saved = save(llama, tmp_path / "saved")
    written = draft(llama, tmp_path / "drafted")
    # Private until published: a hidden sibling of the target, without card or metadata yet.
    assert written.path.parent == tmp_path and written.path.name.startswith(".drafted.")
    assert not (tmp_path / "drafted").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in written.path.iterdir()
    }
    assert not {"README.md", "slimformer.json"} & {p.name for p in written.path.iterdir()}
    # Loaded as load_artifact loads the published folder: the dynamic_int8 layers are torch's
    # again, though no slimformer.json says so yet.
    artifact = written.load()
    assert len([m for m in artifact.model.modules() if isinstance(m, DynamicInt8Linear)]) == 14
    ids = torch.randint(6, 128, (2, 12))
    with torch.inference_mode():
        assert torch.equal(artifact.model(input_ids=ids).logits, llama.model(input_ids=ids).logits)

    published = written.publish(metrics=METRICS)
    assert not written.path.exists() and published[0].parent == tmp_path / "drafted"
    assert [p.name for p in published] == [p.name for p in saved]
    for a, b in zip(published, saved, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    metadata = json.loads((tmp_path / "drafted" / "slimformer.json").read_text())
    assert metadata["torch_dynamic_int8_layers"] == sorted(
        name for name, m in llama.model.named_modules() if isinstance(m, DynamicInt8Linear)
    )
    with pytest.raises(RuntimeError, match="published or discarded"):
        written.publish(metrics=METRICS)  # the card and metadata are written once


def test_a_discarded_draft_leaves_nothing(llama, tmp_path):
    quantize(llama)
    written = draft(llama, tmp_path / "artifact")
    assert written.path.is_dir()
    written.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="published or discarded"):
        written.publish(metrics=METRICS)
    assert list(tmp_path.iterdir()) == []


def test_verify_returns_the_artifact_it_measured(llama, tmp_path):
    # Weight-only int4: the CPU kernels compute in bfloat16, so the artifact's outputs differ
    # from the in-memory model's and the report's difference is the loaded artifact's own.
    compress(llama.model, Recipe(stages=[RtnConfig(bits=4, group_size=32)]))
    written = draft(llama, tmp_path / "artifact")
    ids = torch.randint(6, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    check = verify(written, llama.model, "causal-lm", ids)
    assert isinstance(check.artifact, LoadedModel) and check.artifact.folder == written.path
    assert check.report["runtime"] == check.artifact.model.slimformer_runtime
    assert check.report["runtime"]["kernels"] == {"int4": 14}
    assert check.report["weights_exact_layers"] == 14
    with torch.inference_mode():
        difference = (
            (check.artifact.model(input_ids=ids).logits - llama.model(input_ids=ids).logits)
            .abs()
            .max()
            .item()
        )
    assert 0 < check.report["max_abs_diff"] == difference
    assert not (written.path / "slimformer.json").exists()  # verifying writes nothing

    written.publish(metrics=METRICS)
    on_folder = verify(tmp_path / "artifact", llama.model, "causal-lm", ids)
    assert on_folder.artifact.folder == tmp_path / "artifact"
    assert on_folder.report == check.report
    assert verify_export(tmp_path / "artifact", llama.model, "causal-lm", ids) == check.report


def test_a_format_has_one_layout():
    with pytest.raises(ValueError, match="already has a layout"):
        register_layout(IntQuantized())
