"""The same model, data, seed and recipe give the same artifact, byte for byte: two independent
runs (fresh model, calibration sampled again) are compared file by file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.engine.conftest import SENTENCES
from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.export import save_model
from workers.compression.recipe import Recipe

RECIPES = {
    "gptq": [{"method": "gptq", "group_size": 16, "act_order": True}],
    "awq": [{"method": "awq", "group_size": 16, "symmetric": False}],
    "smoothquant+w8a8": [{"method": "smoothquant"}, {"method": "w8a8", "activations": "static"}],
    "fp8": [{"method": "fp8", "activations": "dynamic"}],
}


def run(make_llama, stages: list[dict], folder: Path, seed: int) -> dict[str, str]:
    loaded = make_llama()
    samples = calibration_batches(
        SENTENCES * 8, loaded.tokenizer, num_samples=6, seq_len=12, seed=seed
    )
    recipe = {"stages": stages}
    compress(loaded.model, Recipe.model_validate(recipe), samples)
    save_model(
        loaded,
        loaded.model,
        folder,
        recipe=recipe,
        metrics={},
        inputs={"calibration_seed": seed},
        versions={"torch": "pinned"},
    )
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_inputs_same_artifact_bytes(make_llama, tmp_path, name):
    first = run(make_llama, RECIPES[name], tmp_path / "first", seed=0)
    second = run(make_llama, RECIPES[name], tmp_path / "second", seed=0)
    assert first == second


def test_another_calibration_seed_gives_other_weights(make_llama, tmp_path):
    first = run(make_llama, RECIPES["gptq"], tmp_path / "first", seed=0)
    other = run(make_llama, RECIPES["gptq"], tmp_path / "other", seed=1)
    assert first["model.safetensors"] != other["model.safetensors"]
