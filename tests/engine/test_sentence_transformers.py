"""MiniLM artifacts in sentence-transformers, the way that model is used: `SentenceTransformer(folder)`
loads and runs every quantized layout (int8 is covered by the end-to-end job in
tests/service/test_end_to_end.py; here the packed 4-bit layout with zero points and FP8), with the
source's pooling and normalisation, and the card says how."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, CompressedTensorsConfig

from tests.engine.test_real_models import records
from workers.compression import compress
from workers.compression.examples import builtin_model_folder
from workers.compression.export import save_model
from workers.compression.loading import load_model
from workers.compression.recipe import Recipe

pytestmark = pytest.mark.real_model

SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return [record["text"] for record in records("lee-sentences")[:32]]


@pytest.fixture(scope="module")
def original(cache_dir, sentences) -> torch.Tensor:
    folder = builtin_model_folder("all-MiniLM-L6-v2", cache_dir)
    return SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_tensor=True)


@pytest.mark.parametrize(
    ("stage", "mean_floor"),
    [
        # Measured on these 32 sentences: mean 0.9647, min 0.9551 (4-bit, groups of 64, zero
        # points: the layout transformers can only read dequantized).
        ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}, 0.95),
        ({"method": "fp8"}, 0.99),  # measured mean 0.9982
    ],
    ids=["rtn-int4-asymmetric", "fp8"],
)
def test_quantized_minilm_runs_in_sentence_transformers(
    cache_dir, tmp_path, sentences, original, stage, mean_floor
):
    loaded = load_model(builtin_model_folder("all-MiniLM-L6-v2", cache_dir), device="cpu")
    compress(loaded.model, Recipe.model_validate({"stages": [stage]}))
    folder = tmp_path / "artifact"
    save_model(loaded, loaded.model, folder, recipe={"stages": [stage]}, metrics={}, inputs={})
    assert (folder / "1_Pooling" / "config.json").is_file()
    assert json.loads((folder / "modules.json").read_text())[1]["path"] == "1_Pooling"

    model = SentenceTransformer(str(folder), device="cpu")
    embeddings = model.encode(sentences, convert_to_tensor=True)
    cosine = F.cosine_similarity(embeddings, original)
    assert cosine.mean().item() >= mean_floor

    # What it runs is the artifact's weights, dequantized, with the source's mean pooling and
    # normalisation: the same as transformers' dequantizing load pooled by hand.
    plain = AutoModel.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    batch = model.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = plain(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert F.cosine_similarity(embeddings, expected).min().item() > 0.9999

    card = (folder / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "SentenceTransformer(" in card
