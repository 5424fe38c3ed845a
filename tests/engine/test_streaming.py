"""Streamed models (`workers/compression/streaming.py`) compute exactly what the model held whole
does: the same codes, the same outputs, the same export check; and they hold no block in memory
between uses. Tiny random models from a config; the real ones are in test_streamed_real.py and the
1.24B-parameter job in tests/service/test_big_model.py."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import tiny_bert, tiny_llama
from workers.compression import compress
from workers.compression.calibration import block_state
from workers.compression.export import load_artifact, verify, write_draft
from workers.compression.loading import load_model
from workers.compression.recipe import Recipe
from workers.compression.streaming import store_of, stream_forward

RECIPES = {
    "rtn": [{"method": "rtn", "bits": 4, "group_size": 16}],
    "gptq": [{"method": "gptq", "bits": 4, "group_size": 16}],
    "smoothquant+w8a8": [{"method": "smoothquant"}, {"method": "w8a8", "activations": "static"}],
    "sparsegpt": [{"method": "sparsegpt", "sparsity": 0.5}],
    "structured": [{"method": "structured", "attention_heads": 0.5, "ffn_channels": 0.25}],
    "structured-magnitude": [
        {"method": "structured", "ffn_channels": 0.5, "criterion": "magnitude"}
    ],
}


def saved(loaded, folder):
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(6, 100, (1, 24), generator=generator) for _ in range(4)]


def compressed_both_ways(folder, stages, scratch):  # noqa: ANN001, ANN201
    """The model at `folder` loaded whole and streamed, each compressed with the same recipe."""
    recipe = Recipe.model_validate({"stages": stages})
    whole = load_model(folder, device="cpu")
    streamed = load_model(folder, device="cpu", streamed=True, scratch=scratch)
    compress(whole.model, recipe, calibration())
    compress(streamed.model, recipe, calibration())
    return whole, streamed


def assert_block_equal(block, store, index: int) -> dict:  # noqa: ANN001
    """Block `index` of the streamed store equals the whole model's `block`; its state."""
    with store.resident(index, keep_changes=False) as resident:
        expected, actual = block_state(block), block_state(resident)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (index, key)
        return actual


def assert_same_logits(whole, streamed) -> None:  # noqa: ANN001
    """The streamed model's forward gives exactly the whole model's logits."""
    ids = torch.randint(6, 100, (1, 16))
    with torch.inference_mode():
        expected = whole.model(input_ids=ids, use_cache=False).logits
    actual = stream_forward(
        streamed.model, [{"input_ids": ids, "use_cache": False}], lambda _, out: out.logits
    )[0]
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_streamed_model_compresses_to_the_same_weights(name, tmp_path) -> None:
    folder = saved(tiny_llama(layers=3), tmp_path / "model")
    whole, streamed = compressed_both_ways(folder, RECIPES[name], tmp_path / "blocks")
    store = store_of(streamed.model)
    for index, block in enumerate(whole.model.model.layers):
        assert streamed.model.model.layers[index].mlp.up_proj.weight.device.type == "meta"
        assert_block_equal(block, store, index)
    assert_same_logits(whole, streamed)


@pytest.mark.parametrize("name", ["rtn", "gptq", "sparsegpt"])
def test_a_bf16_model_streamed_one_layer_at_a_time_compresses_to_the_same_weights(
    name, tmp_path
) -> None:
    """A bf16 checkpoint: the streamed model keeps each block's Linear weights in bf16 and
    upcasts one layer at a time (`BlockStore.onload(lazy=True)`); the results are still exactly
    those of the model upcast whole."""
    loaded = tiny_llama(layers=2)
    loaded.model.to(torch.bfloat16)
    folder = saved(loaded, tmp_path / "model")
    whole, streamed = compressed_both_ways(folder, RECIPES[name], tmp_path / "blocks")
    store = store_of(streamed.model)
    for index, block in enumerate(whole.model.model.layers):
        actual = assert_block_equal(block, store, index)
        with store.resident(index, keep_changes=False, lazy=True) as resident:
            # Lazily onloaded: nothing upcast, a quantized layer's weight is its codes only.
            weight = resident.mlp.up_proj.weight
            pruned = name == "sparsegpt"  # changed weights are kept as computed: float32
            assert (weight.dtype, weight.device.type) == (
                (torch.float32, "cpu") if pruned else (torch.float32, "meta")
            )
            assert resident.input_layernorm.weight.dtype == torch.float32
            lazy = block_state(resident)
            assert all(torch.equal(lazy[key], actual[key]) for key in actual)
    assert_same_logits(whole, streamed)


def test_a_streamed_export_is_checked_and_loads(tmp_path) -> None:
    folder = saved(tiny_llama(layers=4), tmp_path / "model")
    streamed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "blocks")
    compress(streamed.model, Recipe.model_validate({"stages": RECIPES["gptq"]}), calibration())
    draft = write_draft(streamed, streamed.model, tmp_path / "out", recipe={}, inputs={})
    check = verify(draft, streamed.model, streamed.task, torch.randint(6, 100, (1, 12)))
    assert check.artifact is None
    assert check.report["blocks"] == 4 and check.report["weights_exact_layers"] == 4 * 7
    assert check.report["max_abs_diff"] <= check.report["tolerance"]
    draft.publish(metrics={})
    loaded = load_artifact(tmp_path / "out")
    assert loaded.model.slimformer_runtime["kernels"]


def test_a_streamed_bf16_export_is_checked_on_a_one_block_prefix(tmp_path, monkeypatch) -> None:
    """Short of memory, the check loads one block; the prefix keeps the embeddings and head in
    bf16 as stored (computing in float32, as the engine's streamed model does) and agrees."""
    from workers.compression import streaming
    from workers.compression.export import _load

    tiny = tiny_llama(tie=False, layers=3)
    tiny.model.to(torch.bfloat16)
    folder = saved(tiny, tmp_path / "model")
    # This tiny model's embeddings count as "large" (kept in bf16), its norms do not.
    monkeypatch.setattr(streaming, "NATIVE_SKELETON_NUMEL", tiny.model.lm_head.weight.numel())
    streamed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "blocks")
    assert streamed.model.lm_head.weight.dtype == torch.bfloat16
    compress(streamed.model, Recipe.model_validate({"stages": RECIPES["gptq"]}), calibration())
    draft = write_draft(streamed, streamed.model, tmp_path / "out", recipe={}, inputs={})
    monkeypatch.setenv("SLIMFORMER_MEMORY_LIMIT_BYTES", "1")
    check = verify(draft, streamed.model, streamed.task, torch.randint(6, 100, (1, 12)))
    assert check.report["loaded_blocks"] == 1 and check.report["blocks"] == 3
    assert check.report["max_abs_diff"] <= check.report["tolerance"]
    prefix = _load(draft.path, device="cpu", records=draft.records, blocks=1).model
    assert prefix.lm_head.weight.dtype == prefix.model.embed_tokens.weight.dtype == torch.bfloat16
    assert prefix.model.norm.weight.dtype == torch.float32
    assert prefix(input_ids=torch.tensor([[6, 7, 8]])).logits.dtype == torch.float32


def test_a_streamed_structured_export_has_the_pruned_shapes(tmp_path) -> None:
    """Structured pruning streamed, then quantized: the export is checked against the rewritten
    config's shapes and loads in plain transformers with the pruned widths."""
    from transformers import AutoModelForCausalLM

    folder = saved(tiny_llama(layers=3), tmp_path / "model")
    streamed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "blocks")
    stages = RECIPES["structured"] + [{"method": "rtn", "bits": 4, "group_size": 8}]
    compress(streamed.model, Recipe.model_validate({"stages": stages}), calibration())
    draft = write_draft(streamed, streamed.model, tmp_path / "out", recipe={}, inputs={})
    check = verify(draft, streamed.model, streamed.task, torch.randint(6, 100, (1, 12)))
    assert check.report["blocks"] == 3
    assert check.report["max_abs_diff"] <= check.report["tolerance"]
    draft.publish(metrics={})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert plain.config.intermediate_size == streamed.model.config.intermediate_size == 48  # of 64
    assert plain.model.layers[0].mlp.down_proj.in_features == plain.config.intermediate_size


def test_a_tampered_streamed_export_fails_its_check(tmp_path) -> None:
    import safetensors.torch

    folder = saved(tiny_llama(layers=2), tmp_path / "model")
    streamed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "blocks")
    compress(streamed.model, Recipe.model_validate({"stages": RECIPES["rtn"]}))
    draft = write_draft(streamed, streamed.model, tmp_path / "out", recipe={}, inputs={})
    path = draft.path / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight_packed"] = torch.flip(
        tensors["model.layers.1.mlp.up_proj.weight_packed"], dims=[0]
    ).contiguous()
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    from workers.compression.export import ExportVerificationError

    with pytest.raises(ExportVerificationError):
        verify(draft, streamed.model, streamed.task, torch.randint(6, 100, (1, 12)))


def test_an_encoder_streams_too(tmp_path) -> None:
    folder = saved(tiny_bert(layers=2), tmp_path / "model")
    whole = load_model(folder, device="cpu")
    streamed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "blocks")
    ids = torch.randint(6, 100, (2, 10))
    with torch.inference_mode():
        expected = whole.model(input_ids=ids).last_hidden_state
    actual = stream_forward(
        streamed.model, [{"input_ids": ids}], lambda _, out: out.last_hidden_state
    )[0]
    assert torch.allclose(expected, actual, atol=1e-6)


@pytest.mark.parametrize("name", ["gptq", "structured"])
def test_a_killed_streamed_run_resumes_to_the_same_model(name, tmp_path) -> None:
    """Block checkpoints resume a streamed model too; structured pruning's finished blocks come
    back in their pruned shapes (their saved tensors no longer fit the checkpoint's)."""
    from app.storage import LocalStore
    from tests.engine.test_quant import Killed
    from workers.checkpoints import StorageBlockCheckpoint

    folder = saved(tiny_llama(layers=3), tmp_path / "model")
    recipe = Recipe.model_validate({"stages": RECIPES[name]})
    whole = load_model(folder, device="cpu")
    compress(whole.model, recipe, calibration())
    store = LocalStore(tmp_path / "store")

    def checkpoints(stage_index: int) -> StorageBlockCheckpoint:
        return StorageBlockCheckpoint(store, f"checkpoints/{stage_index}")

    def dies_after_block_1(update) -> None:  # noqa: ANN001
        if update.step == 2:
            raise Killed

    killed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "killed")
    with pytest.raises(Killed):
        compress(
            killed.model, recipe, calibration(), progress=dies_after_block_1,
            checkpoints=checkpoints,
        )  # fmt: skip
    steps = []
    resumed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "resumed")
    compress(
        resumed.model, recipe, calibration(), progress=lambda update: steps.append(update.step),
        checkpoints=checkpoints,
    )  # fmt: skip
    assert steps == [3]  # only block 2 ran again
    blocks = store_of(resumed.model)
    for index, block in enumerate(whole.model.model.layers):
        assert_block_equal(block, blocks, index)


def test_a_memory_mapped_tensor_leaves_the_resident_set_once_read(tmp_path) -> None:
    """`drop_pages`: a checkpoint tensor read through its memory map is resident only while it is
    read; its values are intact (read again from the file); heap memory is never dropped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from workers.compression.process_memory import status_bytes
    from workers.compression.streaming import drop_pages

    values = torch.arange(8 << 20, dtype=torch.float32)  # 32 MiB
    save_file({"t": values}, tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as stored:
        mapped = stored.get_tensor("t")
    before = status_bytes("RssFile")
    assert torch.equal(mapped, values)  # read: resident
    read = status_bytes("RssFile")
    assert read - before > 16 << 20
    assert drop_pages(mapped)
    assert status_bytes("RssFile") - before < 4 << 20
    assert torch.equal(mapped, values)
    assert not drop_pages(values)  # heap memory: refused
    mapped.add_(0)  # written in place: never dropped (the write would be lost)
    assert not drop_pages(mapped)


@pytest.mark.parametrize(
    "stages",
    [
        [{"method": "w8a8", "activations": "dynamic"}],
        [{"method": "smoothquant"}, {"method": "w8a8"}],
    ],
    ids=["w8a8", "smoothquant+w8a8"],
)
def test_a_layer_a_stage_replaces_is_freed_as_it_leaves_its_block(stages, tmp_path) -> None:
    """W8A8 (like FP8 and dynamic int8) swaps each lazily onloaded Linear for a module of its own;
    the Linear it replaced, with its weight (memory-mapped or upcast), is freed then, not at the
    next garbage collection: nothing refers to it, not even its own forward."""
    import gc
    import weakref

    loaded = tiny_llama(layers=2)
    loaded.model.to(torch.bfloat16)
    folder = saved(loaded, tmp_path / "model")
    streamed = load_model(folder, device="cpu", streamed=True, scratch=tmp_path / "blocks")
    linears = [
        weakref.ref(module)
        for name, module in streamed.model.model.layers.named_modules()
        if type(module) is torch.nn.Linear
    ]
    gc.collect()
    gc.disable()
    try:
        compress(streamed.model, Recipe.model_validate({"stages": stages}), calibration())
        alive = [ref() for ref in linears if ref() is not None]
        assert alive == []
    finally:
        gc.enable()


def test_a_bf16_head_computes_in_float32_in_a_copy_too() -> None:
    """`compute_in_float32` gives the head a forward of its own (held weakly: no cycle that would
    keep a finished model's head alive); a deep copy's head computes with the copy's weight."""
    import copy

    from workers.compression.streaming import compute_in_float32

    loaded = tiny_llama(layers=1)
    loaded.model.to(torch.bfloat16)
    compute_in_float32(loaded.model)
    twin = copy.deepcopy(loaded.model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    x = torch.ones(1, loaded.model.config.hidden_size)
    assert twin.lm_head(x).dtype == torch.float32
    assert torch.equal(twin.lm_head(x), torch.zeros_like(twin.lm_head(x)))
    assert loaded.model.lm_head(x).abs().sum() > 0


def test_a_later_stage_leaves_one_scratch_file_per_block(tmp_path) -> None:
    """SmoothQuant changes every block's weights and norms (float32 scratch files); W8A8 then
    replaces the weights. The norms move into W8A8's file, so SmoothQuant's files, superseded,
    are deleted: one file per block is left, and the model is still the whole model's."""
    loaded = tiny_llama(layers=3)
    loaded.model.to(torch.bfloat16)
    folder = saved(loaded, tmp_path / "model")
    stages = RECIPES["smoothquant+w8a8"]
    whole, streamed = compressed_both_ways(folder, stages, tmp_path / "blocks")
    files = sorted(path.name for path in (tmp_path / "blocks").glob("*.safetensors"))
    assert files == [f"block-{index}-v2.safetensors" for index in range(3)]
    store = store_of(streamed.model)
    for index, block in enumerate(whole.model.model.layers):
        assert_block_equal(block, store, index)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", ["rtn", "sparsegpt"])
def test_a_bf16_model_is_exported_in_bf16(name, streamed, tmp_path) -> None:
    """Held whole (upcast to float32) or streamed, a bf16 checkpoint's artifact stores its float
    tensors in bf16: the untouched ones as they came, SparseGPT's updated weights rounded to bf16
    by the method itself (so the model measured is the model written), never as float32 twice
    the checkpoint's size."""
    from safetensors import safe_open

    loaded = tiny_llama(layers=2)
    loaded.model.to(torch.bfloat16)
    folder = saved(loaded, tmp_path / "model")
    model = load_model(folder, device="cpu", streamed=streamed, scratch=tmp_path / "blocks")
    result = compress(model.model, Recipe.model_validate({"stages": RECIPES[name]}), calibration())
    draft = write_draft(
        model, result.model, tmp_path / "out", recipe={}, inputs={}, sparse_storage="dense"
    )
    dtypes = {}
    for path in draft.path.glob("*.safetensors"):
        with safe_open(path, "pt") as stored:
            for key in stored.keys():  # noqa: SIM118 (safe_open has no __iter__)
                dtypes[key] = stored.get_slice(key).get_dtype()
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert dtypes["model.norm.weight"] == "BF16"
    if name == "sparsegpt":
        assert dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16"
        size = sum(path.stat().st_size for path in draft.path.glob("*.safetensors"))
        assert size <= 1.05 * sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    check = verify(draft, result.model, model.task, torch.tensor([[1, 7, 9, 11]]))
    assert check.report["max_abs_diff"] <= check.report["tolerance"]
    draft.discard()
