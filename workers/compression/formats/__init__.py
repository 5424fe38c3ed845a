"""Storage layouts, one object each (`layout.Layout`), and the registry that finds them.

Writing, a model's layout is the one quantized layout whose layers it holds (two are refused: one
artifact holds one format), else the float layout its `sparse_storage` names. Reading, it is the
one layout that recognises config.json's `quantization_config`. Adding a layout is one file with
a `Layout` subclass, registered at the end of this one.

Counting, `weight_census` asks the folder's layout which tensors hold its stored layers
(`Layout.stored_layers`), so `parameters` and `bits_per_weight` are those of the logical weights
whatever the layout packs them into.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from workers.compression.formats.dense import Dense
from workers.compression.formats.float_quantized import FloatQuantized
from workers.compression.formats.int_quantized import IntQuantized
from workers.compression.formats.layout import (
    Layout,
    StoredTensor,
    UnsupportedExportError,
)
from workers.compression.formats.pack_quantized import PackQuantized
from workers.compression.formats.sparse_bitmask import SparseBitmask
from workers.compression.loading import UnsupportedModelError
from workers.compression.shards import read_header

_LAYOUTS: dict[str, Layout] = {}  # by format name


def register_layout(layout: Layout) -> Layout:
    """Add `layout` under each of its format names; a name has one layout only."""
    for name in layout.formats:
        if name in _LAYOUTS:
            raise ValueError(f"format {name!r} already has a layout registered")
    _LAYOUTS.update(dict.fromkeys(layout.formats, layout))
    return layout


def layouts() -> list[Layout]:
    """Every registered layout once, in registration order."""
    return list(dict.fromkeys(_LAYOUTS.values()))


def float_storages() -> tuple[str, ...]:
    """The `sparse_storage` values: how a model without quantized layers may be stored."""
    return tuple(layout.float_storage for layout in layouts() if layout.float_storage)


def layout_writing(model: nn.Module, *, sparse_storage: str) -> tuple[Layout, dict[str, nn.Module]]:
    """(the layout `model` is stored in, the layers it stores)."""
    if sparse_storage not in float_storages():
        raise ValueError(
            f"sparse storage must be one of {float_storages()}, got {sparse_storage!r}"
        )
    quantized = [
        (layout, layers)
        for layout in layouts()
        if layout.float_storage is None and (layers := layout.layers(model))
    ]
    if len(quantized) > 1:
        raise UnsupportedExportError(
            "the model mixes "
            + " and ".join(
                f"{layout.kind} layers (e.g. {sorted(layers)[0]})" for layout, layers in quantized
            )
            + ": one artifact holds one compressed-tensors format; quantize with one of them"
        )
    if quantized:
        return quantized[0]
    layout = next(layout for layout in layouts() if layout.float_storage == sparse_storage)
    return layout, layout.layers(model)


def layout_reading(quantization: dict | None) -> tuple[Layout, str]:
    """(the layout of a config.json `quantization_config` (None: it has none), its format), after
    that layout checked it can load it; UnsupportedModelError if no one layout can."""
    recognised = [
        (layout, storage_format)
        for layout in layouts()
        if (storage_format := layout.check_scheme(quantization)) is not None
    ]
    if len(recognised) == 1:
        return recognised[0]
    if recognised:
        raise UnsupportedModelError(
            f"quantization_config names {len(recognised)} formats at once: "
            f"{[storage_format for _, storage_format in recognised]}"
        )
    raise UnsupportedModelError(
        f"unsupported quantization_config: {quantization.get('quant_method')} "
        f"{quantization.get('format')}"
    )


# safetensors dtypes of float tensors: weights. Integer tensors a layout does not claim are
# buffers (BERT's `position_ids`), not parameters.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class WeightCensus:
    """What the weight files of a folder hold, counted in logical weights (see `weight_census`)."""

    format: str
    parameters: int  # every weight, each stored tensor once (so tied weights once)
    linear_weights: int  # of which the Linear layers' weights ([out, in] each)
    linear_bytes: int  # the bytes that hold those: values, scales, zero points, masks, shapes
    stored_layers: int  # Linear layers the layout stores in a form of its own

    @property
    def bits_per_weight(self) -> float | None:
        return 8 * self.linear_bytes / self.linear_weights if self.linear_weights else None


def stored_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors files, from their headers (no data read)."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        header, _ = read_header(path)
        for key, entry in header.items():
            if key != "__metadata__":
                start, end = entry["data_offsets"]
                tensors[key] = StoredTensor(
                    key, entry["dtype"], tuple(entry["shape"]), end - start, path
                )
    return tensors


def weight_census(folder: Path, linear_names: Iterable[str]) -> WeightCensus:
    """Count the weights stored in `folder`: its layout (from config.json's
    `quantization_config`) names the layers it stores in a form of its own, with their logical
    weights and bytes; every other float tensor holds one weight per element. `linear_names`: the
    Linear layers of the model loaded from it, which tell its dense Linear weights from embeddings
    and norms (a checkpoint's names may carry or lack the base model's prefix)."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    quantization = config.get("quantization_config")
    layout, storage_format = layout_reading(quantization)
    tensors = stored_tensors(folder)
    stored = layout.stored_layers(tensors, quantization)
    claimed = set().union(*(layer.keys for layer in stored.values()))
    linears = set(linear_names)

    def is_linear_weight(key: str) -> bool:
        if not key.endswith(".weight"):
            return False
        layer = key.removesuffix(".weight")
        return layer in linears or any(
            layer.endswith("." + name) or name.endswith("." + layer) for name in linears
        )

    parameters = sum(layer.weights for layer in stored.values())
    linear_weights = parameters
    linear_bytes = sum(layer.nbytes for layer in stored.values())
    for key, tensor in tensors.items():
        if key in claimed or tensor.dtype not in _FLOAT_DTYPES:
            continue
        parameters += tensor.numel
        if len(tensor.shape) == 2 and is_linear_weight(key):
            linear_weights += tensor.numel
            linear_bytes += tensor.nbytes
    return WeightCensus(storage_format, parameters, linear_weights, linear_bytes, len(stored))


# Registration order is the order messages name them in (and checks refuse a config in).
register_layout(SparseBitmask())
register_layout(IntQuantized())
register_layout(FloatQuantized())
register_layout(PackQuantized())
register_layout(Dense())
