"""Model folder inspection: tiny real models saved by transformers are accepted with the right
facts; code, remote-code configs, pickles and broken headers are refused with the right code."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from workers.compression.archive import extract_archive, list_members
from workers.compression.model_inspection import (
    ModelRejected,
    inspect_model_folder,
    is_pickled_weight,
    sha256_file,
)

TINY_BERT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Tiny random models saved once as transformers saves them: name -> (folder, parameters)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    built = {
        "bert": BertModel(BertConfig(**TINY_BERT)),
        "bert-classifier": BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3)),
        "llama": LlamaForCausalLM(llama_config),
    }
    saved = {}
    for name, model in built.items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        saved[name] = (folder, model.num_parameters())
    return saved


@pytest.fixture
def bert(saved_models: dict[str, tuple[Path, int]], tmp_path: Path) -> Path:
    """A private copy of the tiny BERT folder, free to damage."""
    return Path(shutil.copytree(saved_models["bert"][0], tmp_path / "bert"))


def edit_json(path: Path, **changes: object) -> None:
    content = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**content, **changes}))


def assert_rejected(folder: Path, code: str) -> ModelRejected:
    with pytest.raises(ModelRejected) as caught:
        inspect_model_folder(folder)
    assert caught.value.code == code, caught.value.message
    return caught.value


# --- accepted models ------------------------------------------------------------------------------


def test_tiny_bert_is_a_feature_extractor_with_exact_facts(saved_models):
    folder, parameters = saved_models["bert"]

    info = inspect_model_folder(folder)

    assert (info.architecture, info.model_type, info.task) == (
        "BertModel",
        "bert",
        "feature-extraction",
    )
    assert info.parameters == parameters
    assert info.weight_format == "safetensors"
    assert info.weight_files == ["model.safetensors"]
    assert info.size_bytes == (folder / "model.safetensors").stat().st_size
    assert info.linear_shapes["encoder.layer.0.attention.self.query"] == [32, 32]
    assert info.linear_shapes["encoder.layer.1.intermediate.dense"] == [37, 32]
    assert info.linear_shapes["encoder.layer.1.output.dense"] == [32, 37]
    assert info.linear_shapes["embeddings.word_embeddings"] == [99, 32]
    assert not any(name.endswith("LayerNorm") for name in info.linear_shapes)  # 1-D weights
    assert info.config["hidden_size"] == 32


def test_tiny_llama_is_a_causal_lm(saved_models):
    folder, parameters = saved_models["llama"]

    info = inspect_model_folder(folder)

    assert (info.architecture, info.task) == ("LlamaForCausalLM", "causal-lm")
    assert info.parameters == parameters
    assert info.linear_shapes["model.layers.0.self_attn.k_proj"] == [16, 32]  # 2 kv heads of 8
    assert info.linear_shapes["lm_head"] == [128, 32]


def test_tiny_classifier_is_a_sequence_classifier(saved_models):
    info = inspect_model_folder(saved_models["bert-classifier"][0])

    assert (info.architecture, info.task) == (
        "BertForSequenceClassification",
        "sequence-classification",
    )
    assert info.linear_shapes["classifier"] == [3, 32]


def test_integer_buffers_are_not_counted_as_parameters(bert: Path):
    # Older BERT checkpoints store position_ids (int64) next to the weights.
    info_before = inspect_model_folder(bert)
    tensors = {"embeddings.position_ids": np.arange(64, dtype=np.int64)[None]}
    save_file(tensors, bert / "extra.safetensors")

    info = inspect_model_folder(bert)

    assert info.parameters == info_before.parameters
    assert info.weight_files == ["extra.safetensors", "model.safetensors"]


def test_pickles_next_to_safetensors_are_ignored(bert: Path):
    (bert / "pytorch_model.bin").write_bytes(b"never unpickled")

    info = inspect_model_folder(bert)

    assert info.weight_files == ["model.safetensors"]


def test_a_single_gguf_file_is_accepted_for_conversion(tmp_path: Path):
    write_gguf(tmp_path / "model.gguf", "llama")

    info = inspect_model_folder(tmp_path)

    assert (info.weight_format, info.weight_files) == ("gguf", ["model.gguf"])
    assert (info.architecture, info.model_type, info.task) == (
        "LlamaForCausalLM",
        "llama",
        "causal-lm",
    )
    assert info.parameters == 8 * 4 + 4 * 4
    assert info.config["llama.block_count"] == 1


def test_extractor_skipping_pickles_yields_an_accepted_folder(saved_models, tmp_path: Path):
    # How the worker composes the two: skip pickles when the archive also has safetensors.
    archive = tmp_path / "upload"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(saved_models["bert"][0], arcname="tiny-bert")
        pickle = tmp_path / "pytorch_model.bin"
        pickle.write_bytes(b"\x80\x04 pickled")
        bundle.add(pickle, arcname="tiny-bert/pytorch_model.bin")
    has_safetensors = any(m.name.endswith(".safetensors") for m in list_members(archive))

    names = extract_archive(
        archive,
        tmp_path / "model",
        max_members=20,
        max_total_bytes=10_000_000,
        skip=is_pickled_weight if has_safetensors else None,
    )

    assert "pytorch_model.bin" not in names
    assert inspect_model_folder(tmp_path / "model").parameters == saved_models["bert"][1]


# --- unsafe models --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickled_weights_only_are_unsafe(bert: Path, name: str):
    (bert / "model.safetensors").rename(bert / name)

    error = assert_rejected(bert, "unsafe_model")
    assert "convert" in error.message and "safetensors" in error.message


@pytest.mark.parametrize(
    ("file", "changes"),
    [
        ("config.json", {"auto_map": {"AutoModel": "modeling_x.XModel"}}),
        ("config.json", {"text_config": {"auto_map": {"AutoModel": "x.X"}}}),
        ("config.json", {"trust_remote_code": True}),
        ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tok.T", None]}}),
    ],
    ids=["auto_map", "nested-auto_map", "trust_remote_code", "tokenizer-auto_map"],
)
def test_remote_code_configs_are_unsafe(bert: Path, file: str, changes: dict):
    edit_json(bert / file, **changes)

    assert_rejected(bert, "unsafe_model")


@pytest.mark.parametrize("name", ["modeling_x.py", "sub/helpers.py", "__pycache__/x.pyc"])
def test_python_files_are_unsafe(bert: Path, name: str):
    (bert / name).parent.mkdir(parents=True, exist_ok=True)
    (bert / name).write_text("import os\n")

    assert name in assert_rejected(bert, "unsafe_model").message


def test_links_in_the_folder_are_unsafe(bert: Path):
    (bert / "vocab.txt").symlink_to("/etc/passwd")

    assert_rejected(bert, "unsafe_model")


# --- unsupported models ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"model_type": "not-a-real-model"}, "model_type"),
        ({"model_type": None}, "model_type"),
        ({"architectures": ["TimeMachineForCausalLM"]}, "not one transformers provides"),
        ({"architectures": []}, "no architectures"),
        ({"architectures": ["BertForMaskedLM"]}, "BertForMaskedLM is not supported"),
    ],
    ids=["unknown-model-type", "no-model-type", "unknown-arch", "no-arch", "unsupported-task"],
)
def test_configs_transformers_cannot_serve_are_unsupported(bert: Path, changes: dict, reason: str):
    edit_json(bert / "config.json", **changes)

    assert reason in assert_rejected(bert, "unsupported_model").message


def test_missing_or_broken_config_is_unsupported(bert: Path):
    (bert / "config.json").write_text('{"model_type": "bert",')
    assert "not valid JSON" in assert_rejected(bert, "unsupported_model").message

    (bert / "config.json").unlink()
    assert "config.json" in assert_rejected(bert, "unsupported_model").message


def test_no_weights_is_unsupported(bert: Path):
    (bert / "model.safetensors").unlink()

    assert "no weights" in assert_rejected(bert, "unsupported_model").message


def test_missing_shard_named_by_the_index_is_unsupported(bert: Path):
    edit_json(
        bert / "model.safetensors.index.json",
        weight_map={"pooler.dense.weight": "model-00002-of-00002.safetensors"},
    )

    assert "missing" in assert_rejected(bert, "unsupported_model").message


def corrupt_header_length(data: bytes) -> bytes:
    return struct.pack("<Q", 1 << 62) + data[8:]  # must be refused, not allocated


def corrupt_header_json(data: bytes) -> bytes:
    return data[:8] + b"\x00not json" + data[17:]


def truncate_last_tensor(data: bytes) -> bytes:
    return data[:-4]


def grow_a_shape(data: bytes) -> bytes:
    # Same header length, one tensor now claiming more elements than its byte range holds.
    return data.replace(b'"shape":[99,32]', b'"shape":[99,33]', 1)


@pytest.mark.parametrize(
    "damage", [corrupt_header_length, corrupt_header_json, truncate_last_tensor, grow_a_shape]
)
def test_corrupt_safetensors_is_unsupported(bert: Path, damage):
    weights = bert / "model.safetensors"
    damaged = damage(weights.read_bytes())
    assert damaged != weights.read_bytes()
    weights.write_bytes(damaged)

    assert "not valid safetensors" in assert_rejected(bert, "unsupported_model").message


def test_gguf_of_an_architecture_transformers_cannot_convert_is_unsupported(tmp_path: Path):
    write_gguf(tmp_path / "model.gguf", "rwkv6")

    assert "rwkv6" in assert_rejected(tmp_path, "unsupported_model").message


def test_several_gguf_files_are_unsupported(tmp_path: Path):
    write_gguf(tmp_path / "model-q4.gguf", "llama")
    write_gguf(tmp_path / "model-q8.gguf", "llama")

    assert "exactly one" in assert_rejected(tmp_path, "unsupported_model").message


def test_truncated_gguf_is_unsupported(tmp_path: Path):
    write_gguf(tmp_path / "whole.gguf", "llama")
    (tmp_path / "model.gguf").write_bytes((tmp_path / "whole.gguf").read_bytes()[:100])
    (tmp_path / "whole.gguf").unlink()

    assert_rejected(tmp_path, "unsupported_model")


# --- helpers --------------------------------------------------------------------------------------


def test_is_pickled_weight():
    assert all(map(is_pickled_weight, ["pytorch_model.bin", "a/b.PT", "x.pth", "c.ckpt", "d.pkl"]))
    assert not any(map(is_pickled_weight, ["model.safetensors", "model.gguf", "vocab.txt"]))


def test_sha256_file_streams_the_whole_file(tmp_path: Path):
    data = np.random.default_rng(0).bytes(3 << 20)  # spans several read chunks
    (tmp_path / "blob").write_bytes(data)

    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def write_gguf(path: Path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
