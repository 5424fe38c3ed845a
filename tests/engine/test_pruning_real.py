"""Pruning the real SmolLM2-135M: the calibrated methods against magnitude, and a 2:4 artifact.

Measured on this text (seq_len 256, 8 windows; calibration 16 x 256 tokens; 210 block Linears
pruned, lm_head and embeddings dense): FP32 25.9; at 50% unstructured magnitude 273, Wanda 47.6,
SparseGPT 47.0; SparseGPT 2:4 80.1. Magnitude pruning wrecks the model (Sun et al.'s explanation:
the small weights it removes include those of the few input features with outsized activations);
the calibrated methods end under a fifth of its perplexity. With 8 x 256 calibration tokens:
Wanda 48.8, SparseGPT 52.1, SparseGPT 2:4 102.3 (SparseGPT's Hessians need the samples), and
only ~15% less time: SparseGPT's factorisations and column loops, and the 6 perplexity runs,
are where the time goes.
The 2:4 artifact: model.safetensors 339.1 MB in sparse-24-bitmask, 538.1 MB dense (0.63).

The model is loaded once; each method prunes a copy.
"""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.evaluation import Evaluator
from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
from workers.compression.export import load_artifact, save_model
from workers.compression.loading import load_model
from workers.compression.recipe import (
    EvaluationSettings,
    MagnitudeConfig,
    Recipe,
    SparseGptConfig,
    WandaConfig,
)
from workers.compression.sparsity import follows_two_of_four

pytestmark = pytest.mark.real_model


def texts(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in builtin_dataset_jsonl(name).splitlines()]


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    folder = builtin_model_folder("SmolLM2-135M-Instruct", cache_dir)
    loaded = load_model(folder, device="cpu")
    harness = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=EvaluationSettings(metrics=["perplexity"], seq_len=256, max_windows=8),
        records=[{"text": text} for text in texts("enwiki-evaluation")],
        device="cpu",
    )
    calibration = calibration_batches(
        texts("enwiki-calibration"), loaded.tokenizer, num_samples=16, seq_len=256, seed=0
    )
    baseline = harness.measure(loaded.model, folder=None)["perplexity"]
    return loaded, harness, calibration, baseline


def pruned(smollm2, stage):
    """(pruned copy of SmolLM2, stage summary, its perplexity)."""
    loaded, harness, calibration, _ = smollm2
    model = copy.deepcopy(loaded.model)
    started = time.perf_counter()
    summary = compress(model, Recipe(stages=[stage]), calibration).stages[0]
    seconds = time.perf_counter() - started
    perplexity = harness.measure(model, folder=None)["perplexity"]
    print(
        f"\nSmolLM2 {stage.method} {stage.pattern} {stage.sparsity:.0%}: perplexity "
        f"{perplexity:.2f}, sparsity {summary['sparsity']:.4f}, {seconds:.1f} s"
    )
    assert summary["pruned_layers"] == 210 and summary["skipped"] == ["lm_head"]
    return model, summary, perplexity


def test_calibrated_pruning_is_far_better_than_magnitude(smollm2):
    baseline = smollm2[3]
    perplexity = {
        stage.method: pruned(smollm2, stage)[2]
        for stage in (MagnitudeConfig(), WandaConfig(), SparseGptConfig())
    }
    print(f"FP32 {baseline:.2f}: {perplexity}")
    assert all(math.isfinite(value) for value in perplexity.values())
    assert perplexity["magnitude"] > 5 * baseline  # measured 10.5x
    for method in ("wanda", "sparsegpt"):
        assert baseline < perplexity[method] < 2.5 * baseline  # measured 1.84x, 1.81x
        assert perplexity[method] < 0.3 * perplexity["magnitude"]  # measured 0.17


def test_sparsegpt_two_of_four_artifact(smollm2, tmp_path):
    loaded, harness, _, baseline = smollm2
    model, summary, in_memory = pruned(smollm2, SparseGptConfig(pattern="2:4"))
    assert summary["sparsity"] == 0.5 and in_memory < 4 * baseline  # measured 3.1x

    save = dict(recipe={}, metrics={}, inputs={}, versions={"torch": "x"})
    save_model(loaded, model, tmp_path / "sparse", **save)
    save_model(loaded, model, tmp_path / "dense", sparse_storage="dense", **save)
    sizes = {
        kind: (tmp_path / kind / "model.safetensors").stat().st_size for kind in ("sparse", "dense")
    }
    print(f"model.safetensors: {sizes}")
    # Block weights are 79% of the float32 file; 2:4 stores half of them and a bit per weight.
    assert sizes["sparse"] < 0.7 * sizes["dense"]  # measured 0.63

    artifact = load_artifact(tmp_path / "sparse")
    ids = harness.windows[0][0][:, :64]
    with torch.inference_mode():
        assert torch.equal(artifact.model(input_ids=ids).logits, model(input_ids=ids).logits)
    targets = summary["pruned"]
    assert all(follows_two_of_four(artifact.model.get_submodule(n).weight) for n in targets)

    # Plain transformers reads the dense folder (it cannot read the sparse layouts): the same
    # logits on whole evaluation windows, so the same perplexity (measured 80.1221 both ways
    # over all 8 windows; compared on two here to keep CI short).
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.inference_mode():
        for window in harness.windows[:2]:
            ids = window[0]
            assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(follows_two_of_four(plain.get_submodule(n).weight) for n in targets)
