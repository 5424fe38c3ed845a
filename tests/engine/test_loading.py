"""Loading model folders: safetensors only, no remote code, the right task and tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from workers.compression.device import select_device
from workers.compression.export import save_model
from workers.compression.loading import UnsupportedModelError, convert_gguf, load_model, task_of


@pytest.fixture
def llama_folder(llama, tmp_path):
    save_model(llama, llama.model, tmp_path / "llama", recipe={}, metrics={}, inputs={})
    return tmp_path / "llama"


def test_load_model_gives_float32_eval_model_and_tokenizer(llama_folder):
    loaded = load_model(llama_folder, device="cpu")
    assert loaded.task == "causal-lm" and loaded.architecture == "LlamaForCausalLM"
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.tokenizer.pad_token == "</s>"


def test_a_causal_lm_without_pad_token_pads_with_eos(llama_folder):
    config_path = llama_folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(llama_folder).pad_token is None
    assert load_model(llama_folder, device="cpu").tokenizer.pad_token == "</s>"


def test_pickled_weights_are_refused(llama_folder):
    (llama_folder / "model.safetensors").rename(llama_folder / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="no .safetensors"):
        load_model(llama_folder, device="cpu")


def test_custom_code_is_refused(llama_folder):
    config_path = llama_folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type="evil", auto_map={"AutoModelForCausalLM": "evil.EvilModel"})
    config_path.write_text(json.dumps(config))
    (llama_folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError):
        load_model(llama_folder, device="cpu")


def test_task_comes_from_the_architecture():
    assert task_of("LlamaForCausalLM") == "causal-lm"
    assert task_of("BertModel") == "feature-extraction"
    with pytest.raises(UnsupportedModelError):
        task_of("BertForSequenceClassification")


def test_device_override(monkeypatch):
    monkeypatch.setenv("SLIMFORMER_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.delenv("SLIMFORMER_DEVICE")
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_broken_gguf_is_refused_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file" * 100)
    with pytest.raises(UnsupportedModelError, match="GGUF"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out" / "converted")
    assert list((tmp_path / "out").iterdir()) == []
