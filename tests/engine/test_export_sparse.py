"""Pruned models on disk: compressed-tensors' sparse-bitmask / sparse-24-bitmask layouts read back
by load_artifact, and the dense option that plain transformers reads."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.engine.test_quant import calibration
from workers.compression import compress
from workers.compression.export import (
    ExportVerificationError,
    load_artifact,
    save_model,
    verify_export,
)
from workers.compression.formats.pack_quantized import read_packed_layers
from workers.compression.formats.sparse_bitmask import bitmask_tensors, two_four_tensors
from workers.compression.loading import UnsupportedModelError
from workers.compression.quant import dequantize
from workers.compression.recipe import (
    MagnitudeConfig,
    Recipe,
    RtnConfig,
    SparseGptConfig,
    WandaConfig,
)
from workers.compression.sparsity import mask_for

IDS = torch.randint(6, 128, (2, 12), generator=torch.Generator().manual_seed(0))
LAYER = "model.layers.1.mlp.down_proj"


def save(loaded, folder, **options):
    return save_model(
        loaded,
        loaded.model,
        folder,
        recipe={},
        metrics={},
        inputs={},
        versions={"torch": "x"},
        **options,
    )


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def stored(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def quantization_config(folder) -> dict | None:
    return json.loads((folder / "config.json").read_text()).get("quantization_config")


def pruned_weight(shape=(8, 24), pattern="unstructured", sparsity=0.5, seed=0) -> torch.Tensor:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return weight * mask_for(weight.abs(), sparsity=sparsity, pattern=pattern)


# --- the layouts, against compressed-tensors' own bit packing and config classes ---


def test_bitmask_layout_is_compressed_tensors():
    weight = pruned_weight((6, 21), sparsity=0.6)  # 21 columns: the last byte is partial
    weight[2] = 0  # an empty row
    tensors = bitmask_tensors("layer", weight)
    assert set(tensors) == {"layer.compressed", "layer.bitmask", "layer.shape", "layer.row_offsets"}
    mask = weight != 0
    assert torch.equal(tensors["layer.bitmask"], pack_bitmasks(mask))
    assert tensors["layer.bitmask"].dtype == torch.uint8 and tensors["layer.bitmask"].shape == (
        6,
        3,
    )
    assert (
        tensors["layer.shape"].tolist() == [6, 21] and tensors["layer.shape"].dtype == torch.int64
    )
    counts = mask.sum(dim=1)
    assert tensors["layer.row_offsets"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    # Decompressed the way compressed-tensors defines it: values in row-major mask order.
    dense = torch.zeros(6, 21)
    dense[unpack_bitmasks(tensors["layer.bitmask"], [6, 21])] = tensors["layer.compressed"]
    assert torch.equal(dense, weight)


def test_two_four_layout_is_compressed_tensors():
    weight = pruned_weight((4, 16), pattern="2:4")
    weight[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 0.5])  # a group with a single nonzero
    tensors = two_four_tensors("layer", weight)
    assert tensors["layer.shape"].tolist() == [[4], [16]]
    assert tensors["layer.compressed"].shape == (4, 8)
    mask = unpack_bitmasks(tensors["layer.bitmask"], [4, 16])
    assert (mask.reshape(4, 4, 4).sum(dim=2) == 2).all()  # exactly 2 stored per group
    dense = torch.zeros(4, 16)
    dense[mask] = tensors["layer.compressed"].flatten()
    assert torch.equal(dense, weight)


def test_sparsity_config_is_what_compressed_tensors_writes(llama, tmp_path):
    compress(llama.model, Recipe(stages=[MagnitudeConfig(pattern="2:4")]))
    save(llama, tmp_path / "artifact")
    quantization = quantization_config(tmp_path / "artifact")
    assert set(quantization) == {"quant_method", "sparsity_config"}
    sparsity = quantization["sparsity_config"]
    model_dump = SparsityCompressionConfig.load_from_registry(
        sparsity["format"], **sparsity
    ).model_dump()
    assert model_dump == sparsity and sparsity["format"] == "sparse-24-bitmask"
    assert sparsity["sparsity_structure"] == "2:4" and len(sparsity["targets"]) == 14
    # 14 block layers at 50%; embeddings (shared with the head) and norms dense.
    assert 0.2 < sparsity["global_sparsity"] < 0.5


# --- save -> load ---


@pytest.mark.parametrize(
    "stage,storage_format",
    [
        (WandaConfig(), "sparse-bitmask"),
        (SparseGptConfig(pattern="2:4"), "sparse-24-bitmask"),
    ],
)
def test_sparse_round_trip_is_exact_and_smaller(make_llama, tmp_path, stage, storage_format):
    loaded = make_llama()
    compress(loaded.model, Recipe(stages=[stage]), calibration())
    save(loaded, tmp_path / "sparse")
    save(loaded, tmp_path / "dense", sparse_storage="dense")

    tensors = stored(tmp_path / "sparse")
    assert f"{LAYER}.weight" not in tensors and f"{LAYER}.bitmask" in tensors
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied
    assert quantization_config(tmp_path / "sparse")["sparsity_config"]["format"] == storage_format
    metadata = json.loads((tmp_path / "sparse" / "slimformer.json").read_text())
    assert metadata["format"] == storage_format
    sizes = {
        kind: (tmp_path / kind / "model.safetensors").stat().st_size for kind in ("sparse", "dense")
    }
    block_bytes = sum(
        loaded.model.get_submodule(n).weight.numel() * 4
        for n in quantization_config(tmp_path / "sparse")["sparsity_config"]["targets"]
    )
    # Half of the block weights' bytes is saved, less the masks, row offsets and the header's
    # entries for 3 or 4 tensors a layer, which weigh a lot next to 32 x 64 weights (measured 0.35
    # for sparse-bitmask, 0.43 for 2:4; the SmolLM2 test checks the real ratio).
    assert sizes["dense"] - sizes["sparse"] > 0.3 * block_bytes, sizes

    artifact = load_artifact(tmp_path / "sparse")
    assert torch.equal(logits(artifact.model), logits(loaded.model))
    assert torch.equal(
        artifact.model.get_submodule(LAYER).weight, loaded.model.get_submodule(LAYER).weight
    )
    report = verify_export(tmp_path / "sparse", loaded.model, "causal-lm", IDS)
    assert report["max_abs_diff"] == 0.0 and report["sparse_layers_exact"] == 14

    assert quantization_config(tmp_path / "dense") is None
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert torch.equal(logits(plain), logits(loaded.model))
    assert "sparse_layers_exact" not in verify_export(
        tmp_path / "dense", loaded.model, "causal-lm", IDS
    )


def test_mixed_patterns_use_the_general_bitmask(make_llama, tmp_path):
    loaded = make_llama()
    recipe = Recipe(
        stages=[
            MagnitudeConfig(pattern="2:4", modules=["mlp.*"]),
            MagnitudeConfig(sparsity=0.3, modules=["self_attn.*"]),
        ]
    )
    compress(loaded.model, recipe)
    save(loaded, tmp_path / "artifact")
    sparsity = quantization_config(tmp_path / "artifact")["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask" and len(sparsity["targets"]) == 14
    assert torch.equal(logits(load_artifact(tmp_path / "artifact").model), logits(loaded.model))


def test_a_pruned_head_is_stored_on_its_own(llama, tmp_path):
    compress(llama.model, Recipe(stages=[MagnitudeConfig(modules=["Linear"])]))
    save(llama, tmp_path / "artifact")
    tensors = stored(tmp_path / "artifact")
    assert "lm_head.bitmask" in tensors and "model.embed_tokens.weight" in tensors
    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert len(config["quantization_config"]["sparsity_config"]["targets"]) == 15
    assert torch.equal(logits(load_artifact(tmp_path / "artifact").model), logits(llama.model))


def test_unpruned_models_are_saved_as_before(llama, tmp_path):
    save(llama, tmp_path / "artifact")
    assert quantization_config(tmp_path / "artifact") is None
    with pytest.raises(ValueError, match="sparse storage"):
        save(llama, tmp_path / "other", sparse_storage="csr")


def test_saving_twice_gives_identical_bytes(llama, tmp_path):
    compress(llama.model, Recipe(stages=[WandaConfig(sparsity=0.7)]), calibration())
    first = save(llama, tmp_path / "one")
    second = save(llama, tmp_path / "two")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_model_card_says_how_to_load(llama, tmp_path):
    compress(llama.model, Recipe(stages=[MagnitudeConfig()]))
    save(llama, tmp_path / "artifact")
    card = (tmp_path / "artifact" / "README.md").read_text()
    assert "`sparse-bitmask`" in card and "load_artifact" in card
    assert 'sparse_storage="dense"' in card


# --- broken or foreign layouts ---


@pytest.mark.parametrize("damage", ["row_offsets", "values", "two_four_group"])
def test_damaged_layouts_are_refused(make_llama, tmp_path, damage):
    loaded = make_llama()
    pattern = "2:4" if damage == "two_four_group" else "unstructured"
    compress(loaded.model, Recipe(stages=[MagnitudeConfig(pattern=pattern)]))
    save(loaded, tmp_path / "artifact")
    path = tmp_path / "artifact" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    if damage == "row_offsets":
        tensors[f"{LAYER}.row_offsets"][1] += 1
    elif damage == "values":
        tensors[f"{LAYER}.compressed"] = tensors[f"{LAYER}.compressed"][:-1].clone()
    else:
        tensors[f"{LAYER}.bitmask"][0, 0] = 0b111  # three weights in the first group of 4
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=LAYER):
        load_artifact(tmp_path / "artifact")


def test_a_changed_weight_fails_verification(llama, tmp_path):
    compress(llama.model, Recipe(stages=[MagnitudeConfig()]))
    save(llama, tmp_path / "artifact")
    with torch.no_grad():
        weight = llama.model.get_submodule(LAYER).weight
        weight[weight != 0] *= 1 + 1e-6  # below any tolerance on the outputs
    with pytest.raises(ExportVerificationError, match="sparse weights differ"):
        verify_export(tmp_path / "artifact", llama.model, "causal-lm", IDS)


def test_unknown_sparse_formats_are_refused(llama, tmp_path):
    compress(llama.model, Recipe(stages=[MagnitudeConfig()]))
    save(llama, tmp_path / "artifact")
    config_path = tmp_path / "artifact" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="marlin-24"):
        load_artifact(tmp_path / "artifact")


# --- pruned, then quantized ---


def test_pruned_then_quantized_models_keep_their_zeros_in_the_packed_format(make_llama, tmp_path):
    loaded = make_llama()
    recipe = Recipe(stages=[SparseGptConfig(pattern="2:4"), RtnConfig(group_size=16)])
    compress(loaded.model, recipe, calibration())
    zeros = loaded.model.get_submodule(LAYER).weight == 0
    assert zeros.float().mean() >= 0.5
    save(loaded, tmp_path / "artifact")

    quantization = quantization_config(tmp_path / "artifact")
    assert quantization["format"] == "pack-quantized" and "sparsity_config" not in quantization
    with safe_open(tmp_path / "artifact" / "model.safetensors", "pt") as weights:
        state = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118
    layer = read_packed_layers(state, quantization)[LAYER]
    assert (dequantize(layer)[zeros] == 0).all()
    report = verify_export(tmp_path / "artifact", loaded.model, "causal-lm", IDS)
    assert report["weights_exact_layers"] == 14
