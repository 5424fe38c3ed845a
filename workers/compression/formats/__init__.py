"""Storage layouts, one object each (`layout.Layout`), and the registry that finds them.

Writing, a model's layout is the one quantized layout whose layers it holds (two are refused: one
artifact holds one format), else the float layout its `sparse_storage` names. Reading, it is the
one layout that recognises config.json's `quantization_config`. Adding a layout is one file with
a `Layout` subclass, registered at the end of this one.
"""

from __future__ import annotations

from torch import nn

from workers.compression.formats.dense import Dense
from workers.compression.formats.float_quantized import FloatQuantized
from workers.compression.formats.int_quantized import IntQuantized
from workers.compression.formats.layout import Layout, UnsupportedExportError
from workers.compression.formats.pack_quantized import PackQuantized
from workers.compression.formats.sparse_bitmask import SparseBitmask
from workers.compression.loading import UnsupportedModelError

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


# Registration order is the order messages name them in (and checks refuse a config in).
register_layout(SparseBitmask())
register_layout(IntQuantized())
register_layout(FloatQuantized())
register_layout(PackQuantized())
register_layout(Dense())
