"""Exporting and checking a streamed model (`streaming.py`) without ever holding it whole.

Writing: the tensors outside the blocks first, then one block at a time (onloaded, its stored
layers written by the layout, released), each as one part of a `ShardWriter`; the shards (at most
2 GiB each) and their index are assembled from the parts. Float tensors are written in the
checkpoint's dtype wherever that is exact — a bf16 checkpoint's untouched embeddings, norms and
head go back as the bf16 they were, a weight a stage rescaled stays float32.

Checking: every block of the written shards is read back through the layout that wrote it (its
tensor names, dtypes and shapes against the model's architecture and the scheme in config.json,
the packed codes bit for bit against the engine's), then the largest prefix of blocks that fits in
memory is loaded as a model of that depth with the real runtime modules and run on a sample, and
its outputs compared with the engine's model over the same blocks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from workers.compression.calibration import release_freed_memory
from workers.compression.formats.layout import (
    ExportVerificationError,
    Layout,
    LoadContext,
    QuantizedLayout,
    UnsupportedExportError,
)
from workers.compression.quant import ATTRIBUTE, QuantizedWeight, dequantize
from workers.compression.shards import ShardWriter, weight_files
from workers.compression.streaming import (
    NATIVE_SKELETON_NUMEL,
    BlockStore,
    checkpoint_files,
    drop_pages,
    parked_skeleton,
    store_of,
    stream_forward,
    working_weight,
)


def write_streamed(
    model: nn.Module,
    layout: Layout,
    layers: dict[str, nn.Module],
    folder: Path,
    config: dict,
    *,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write `model`'s weights into `folder` as shards, block by block; the format written (and
    `config` updated as the layout describes it). `progress(blocks done, blocks)` after each."""
    store = store_of(model)
    assert store is not None
    if layers and not isinstance(layout, QuantizedLayout):
        raise UnsupportedExportError(
            f"{layout.formats[0]} storage is not available for a model streamed block by block; "
            "store it dense"
        )
    blocks = f"{store.blocks_name}."
    writer = ShardWriter(folder)
    schemes: dict[str, dict] = {}

    def write(tensors: dict[str, torch.Tensor], stored: dict[str, nn.Module]) -> None:
        floats = {
            key: value
            for key, value in tensors.items()
            if not any(layout.replaces(key, name) for name in stored)
        }
        writer.add(floats, narrow_to=dtype)  # in the checkpoint's dtype where that is exact
        layer_tensors: dict[str, torch.Tensor] = {}
        for name, module in stored.items():
            tensors_of_layer, schemes[name] = layout.write_layer(name, module)
            layer_tensors.update(tensors_of_layer)
        writer.add(layer_tensors)

    outside = {name: module for name, module in layers.items() if not name.startswith(blocks)}
    skeleton = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks)}
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        tied = target in skeleton and source in skeleton
        if tied and skeleton[target].data_ptr() == skeleton[source].data_ptr():
            del skeleton[target]  # written once, under the embedding's name (as save_pretrained)
    # The large tensors (embeddings, head) one part each, their pages dropped once written.
    owned = {key for key in skeleton if any(layout.replaces(key, name) for name in outside)}
    for key in [k for k in skeleton if k not in owned]:
        if skeleton[key].numel() >= NATIVE_SKELETON_NUMEL:
            tensor = skeleton.pop(key)
            write({key: tensor}, {})
            drop_pages(tensor.detach())
            del tensor
    write(skeleton, outside)
    del skeleton
    with parked_skeleton(model):  # written: on disk while the blocks are
        for index in range(len(store)):
            prefix = f"{blocks}{index}."
            # Lazily: the Linear weights stay as stored (memory-mapped) until written.
            with store.resident(index, keep_changes=False, lazy=True) as block:
                # Untouched tensors come from the checkpoint itself, in its dtype.
                stored_state = store.read_state(index)
                stored_layers = {n: m for n, m in layers.items() if n.startswith(prefix)}
                tensors = {}
                for key, value in block.state_dict().items():
                    value = stored_state.get(key, value)
                    if value.device.type == "meta":  # a lazy quantized layer's weight
                        owner = key.rpartition(".")[0]
                        if any(layout.replaces(prefix + key, name) for name in stored_layers):
                            continue  # the layout writes the layer itself
                        value = working_weight(block.get_submodule(owner))
                    tensors[prefix + key] = value
                write(tensors, stored_layers)
                del stored_state, tensors
            if progress is not None:
                progress(index + 1, len(store))
    writer.finish()
    if isinstance(layout, QuantizedLayout) and layers:
        return layout.configure(model, layers, schemes, config)
    return layout.formats[0] if layout.float_storage is None else "dense"


def check_streamed(
    folder: Path,
    model: nn.Module,
    layout: Layout,
    task: str,
    sample_input_ids: torch.Tensor,
    *,
    records: dict,
    load_prefix,
) -> dict:
    """See the module docstring. `load_prefix(blocks)` loads the artifact's first `blocks`
    blocks as a model (`export._load`); returns the report, or raises ExportVerificationError."""
    store = store_of(model)
    assert store is not None
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config")
    context = LoadContext(device=torch.device("cpu"), records=records)
    blocks = f"{store.blocks_name}."
    stored_names = checkpoint_files(folder)
    expected = _expected_float_tensors(model)
    exact_layers = 0
    for index in range(len(store)):
        prefix = f"{blocks}{index}."
        state = _read(folder, stored_names, prefix)
        found = layout.read(state, quantization, context) if quantization is not None else {}
        packed = {name for name, stored in found.items() if isinstance(stored, QuantizedWeight)}
        engine = _engine_codes(store, index, prefix)
        if packed != set(engine):
            raise ExportVerificationError(
                f"block {index}: stored layers {sorted(packed ^ set(engine))[:5]} differ "
                "from the model's"
            )
        for name in packed:
            if not _same_weights(found[name], engine[name]):
                raise ExportVerificationError(f"{name}: stored codes differ from the model's")
        exact_layers += len(packed)
        _check_shapes(state, expected, set(found), prefix)
        del state, found, engine  # not kept beside the next block's, nor the loaded prefix
    outside = _read(folder, stored_names, None, exclude=blocks)
    found = layout.read(outside, quantization, context) if quantization is not None else {}
    _check_shapes(outside, expected, set(found), None, exclude=blocks)
    del outside, found
    release_freed_memory(store.device)

    ids = sample_input_ids.to(store.device)
    prefix_blocks = prefix_that_fits(model, store.device)
    expected_out = _engine_prefix_outputs(model, task, ids, prefix_blocks)
    with parked_skeleton(model):
        artifact = load_prefix(prefix_blocks)
        with torch.inference_mode():
            actual = _outputs(artifact.model, task, ids)
        runtime = getattr(artifact.model, "slimformer_runtime", None)
        del artifact
        release_freed_memory(store.device)
    facts = {
        "loaded_blocks": prefix_blocks,
        "blocks": len(store),
        "checked": "every shard's tensors against the architecture and the scheme; the first "
        f"{prefix_blocks} of {len(store)} blocks loaded and run against the engine's model",
        "shards": len(weight_files(folder)),
    }
    exact = {"weights_exact_layers": exact_layers} if exact_layers else {}
    return agreement_report(expected_out, actual, layout, runtime, facts=facts, exact=exact)


def agreement_report(
    expected: torch.Tensor,
    actual: torch.Tensor,
    layout: Layout,
    runtime: dict | None,
    *,
    facts: dict,
    exact: dict,
) -> dict:
    """The load test's report: how far the artifact's outputs `actual` are from the engine's
    `expected`, the bound the artifact's `layout` allows for the kernels its `runtime` ran, then
    the caller's `facts`, the runtime and the layers checked `exact`. Raises ExportVerificationError
    past the bound."""
    max_abs_diff, cosine = _difference(expected, actual)
    relative = layout.relative_tolerance((runtime or {}).get("kernels", {}))
    tolerance = relative * max(1.0, expected.abs().max().item())
    report = {"max_abs_diff": max_abs_diff, "cosine": cosine, "tolerance": tolerance, **facts}
    if runtime is not None:
        report["runtime"] = runtime
    report.update(exact)
    if not max_abs_diff <= tolerance:  # also catches NaN
        raise ExportVerificationError(f"exported model disagrees with the original: {report}")
    return report


def _difference(expected: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    """max |expected - actual| (NaN if either holds one) and their cosine similarity (in float64,
    as `F.cosine_similarity` computes it), a slice at a time: a causal LM's logits over a large
    vocabulary are 30 MB or more, and float64 copies of both, with their products, ten times
    that."""
    expected, actual = expected.flatten(), actual.flatten()
    dot = squares_expected = squares_actual = torch.zeros((), dtype=torch.float64)
    largest = torch.zeros((), dtype=expected.dtype)
    for first in range(0, expected.numel(), _DIFFERENCE_SLICE):
        e = expected[first : first + _DIFFERENCE_SLICE]
        a = actual[first : first + _DIFFERENCE_SLICE]
        largest = torch.maximum(largest, (e - a).abs().max())  # maximum propagates NaN
        e, a = e.double(), a.double()
        dot = dot + (e * a).sum()
        squares_expected = squares_expected + (e * e).sum()
        squares_actual = squares_actual + (a * a).sum()
    eps = 1e-8  # F.cosine_similarity's default
    cosine = dot / (squares_expected * squares_actual).clamp_min(eps * eps).sqrt()
    return largest.item(), cosine.item()


_DIFFERENCE_SLICE = 1 << 20


def _read(
    folder: Path, names: dict[str, Path], prefix: str | None, *, exclude: str | None = None
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for key, path in names.items():
        if (prefix is None or key.startswith(prefix)) and not (exclude and key.startswith(exclude)):
            by_file.setdefault(path, []).append(key)
    state = {}
    for path, keys in by_file.items():
        with safe_open(path, "pt") as stored:
            state.update({key: stored.get_tensor(key) for key in keys})
    return state


def _expected_float_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of the model's architecture, from its meta-device form (the
    stored layers' runtime tensors included; a tied head is not stored)."""
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for target in getattr(model, "all_tied_weights_keys", {}) or {}:
        shapes.pop(target, None)
    return shapes


def _check_shapes(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    stored_layers: set[str],
    prefix: str | None,
    *,
    exclude: str | None = None,
) -> None:
    """What `layout.read` left in `state` are float tensors: each must be one the architecture
    has, with its shape, and every one the architecture has in this part must be there, except
    the tensors of the layers the layout read itself."""
    wanted = {
        key
        for key in expected
        if (prefix is None or key.startswith(prefix))
        and not (exclude and key.startswith(exclude))
        and not any(key.startswith(layer + ".") for layer in stored_layers)
    }
    wrong = [
        f"{key} {tuple(tensor.shape)}"
        for key, tensor in state.items()
        if key not in expected or tuple(tensor.shape) != expected[key]
    ]
    missing = sorted(wanted - set(state))
    if wrong or missing:
        raise ExportVerificationError(
            f"stored tensors do not match the architecture: unexpected {wrong[:5]}, "
            f"missing {missing[:5]}"
        )


def _same_weights(stored: QuantizedWeight, engine: QuantizedWeight) -> bool:
    """Whether two quantized layers stand for the very same weight: their dequantized weights
    compared bit for bit, `_CHECK_ROWS` output rows at a time (rows dequantize independently), so
    the check holds two slices in float32, not two whole 7B-wide weights."""
    if stored.codes.shape != engine.codes.shape:
        return False
    return all(
        torch.equal(dequantize(_rows(stored, first)), dequantize(_rows(engine, first)))
        for first in range(0, stored.codes.shape[0], _CHECK_ROWS)
    )


def _rows(quantized: QuantizedWeight, first: int) -> QuantizedWeight:
    rows = slice(first, first + _CHECK_ROWS)
    zero_point = quantized.zero_point
    return QuantizedWeight(
        codes=quantized.codes[rows],
        scale=quantized.scale[rows],
        zero_point=None if zero_point is None else zero_point[rows],
        bits=quantized.bits,
        group_size=quantized.group_size,
        symmetric=quantized.symmetric,
    )


_CHECK_ROWS = 512


def _engine_codes(store: BlockStore, index: int, prefix: str) -> dict[str, QuantizedWeight]:
    state = store.read_state(index)
    marker = f".{ATTRIBUTE}."
    layers = {key[: key.index(marker)] for key in state if marker in key}
    return {
        prefix + name: QuantizedWeight.from_tensors(state, f"{name}{marker}") for name in layers
    }


def _engine_prefix_outputs(
    model: nn.Module, task: str, ids: torch.Tensor, blocks: int
) -> torch.Tensor:
    """What the engine's model computes on `ids` with only its first `blocks` blocks."""
    kwargs = {"input_ids": ids, "use_cache": False} if task == "causal-lm" else {"input_ids": ids}
    entry = model if task == "causal-lm" else model.base_model
    outputs = stream_forward(
        model,
        [kwargs],
        lambda _, output: _output_tensor(output, task),
        entry=entry,
        blocks=blocks,
    )
    return outputs[0]


def _outputs(model: nn.Module, task: str, ids: torch.Tensor) -> torch.Tensor:
    if task == "causal-lm":
        return model(input_ids=ids, use_cache=False).logits.float()
    return model.base_model(input_ids=ids).last_hidden_state.float()


def _output_tensor(output, task: str) -> torch.Tensor:
    return (output.logits if task == "causal-lm" else output.last_hidden_state).float()


def prefix_that_fits(model: nn.Module, device: torch.device) -> int:
    """How many blocks of the artifact its load test loads: as many as fit, with its skeleton
    (embeddings and head in their stored dtype, as the engine's), in `CHECK_MEMORY_FRACTION` of
    the memory free once the engine's skeleton is parked (the artifact's takes its place), at
    least one. A small fraction: one block already exercises the loading of every layer kind,
    and the check's peak must stay below the compression's."""
    from workers.compression.preflight import available_memory

    store = store_of(model)
    assert store is not None
    block = sum(p.numel() for p in store.blocks[0].parameters()) * 4
    outside = [p for name, p in model.named_parameters() if not name.startswith(store.blocks_name)]
    skeleton = sum(p.numel() * p.element_size() for p in outside)
    free = available_memory(str(device))
    if free is None:
        return len(store)
    budget = CHECK_MEMORY_FRACTION * (free + skeleton) - skeleton
    return max(1, min(len(store), int(budget // max(1, block))))


# 5%: on a 3 GB worker every model's check loads one block (SmolLM2 GPTQ's check phase then
# stays below its compression's peak); a 64 GB one loads a few GB of blocks.
CHECK_MEMORY_FRACTION = 0.05
