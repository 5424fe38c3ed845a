"""What a storage layout is, and what the compressed-tensors quantized layouts share.

A layout is one object that knows everything about one way of storing a model's weights:

- writing: which layers of a model it stores (`layers`), which of the model's state-dict tensors
  it writes itself (`replaces`), and the tensors and config.json entries it writes (`write`);
  plus the facts slimformer.json must record because its files do not tell them (`records`);
- reading: whether it reads a config.json `quantization_config` and can load it (`check_scheme`),
  the stored layers it takes out of the weights (`read`), and the runtime module that runs each
  one (`build`, see `workers/compression/runtime/`);
- checking an artifact against the model it was written from (`verify`), and how closely its
  runtime must reproduce the model (`relative_tolerance`);
- describing itself in the model card (`describe`);
- counting what it stores (`stored_layers`): each stored layer's logical weights and the bytes
  that hold them, read from the weight files' headers, for `parameters` and `bits_per_weight`.

`export.py` runs the steps in order and asks the layouts; the only format fact it knows is that a
folder without a `quantization_config` is a plain transformers one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from workers.compression.loading import UnsupportedModelError

COMPRESSED_TENSORS = "compressed-tensors"  # the `quant_method` of every compressed layout
WEIGHTS_FILE = "model.safetensors"  # every layout writes its tensors into this one file


class ExportVerificationError(RuntimeError):
    """The written artifact does not reproduce the model it was written from."""


class UnsupportedExportError(ValueError):
    """The model holds layers that no single compressed-tensors format can store."""


@dataclass(frozen=True)
class LoadContext:
    """What a layout's loader gets besides the stored tensors: the device the model will run on,
    and what slimformer.json records (for an unpublished draft, what it will record)."""

    device: torch.device
    records: dict


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a weight file as its safetensors header describes it; `value()` reads it
    (meant for the small ones: shapes, offsets)."""

    key: str
    dtype: str  # the safetensors dtype name: "F32", "I32", "F8_E4M3", ...
    shape: tuple[int, ...]
    nbytes: int
    path: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def value(self) -> torch.Tensor:
        with safe_open(self.path, "pt") as stored:
            return stored.get_tensor(self.key)


@dataclass(frozen=True)
class StoredLayer:
    """One layer a layout stores in a form of its own, counted from the files: `weights` logical
    weights ([out, in] of the Linear it runs as) held in `nbytes` bytes (values, scales, zero
    points, masks, shapes: every tensor in `keys`, which are all of the layer's but its bias)."""

    weights: int
    nbytes: int
    keys: frozenset[str]


def stored_layer(weights: int, tensors: dict[str, StoredTensor], keys: list[str]) -> StoredLayer:
    """The `StoredLayer` of `weights` logical weights held in those of `keys` that are stored."""
    present = frozenset(key for key in keys if key in tensors)
    return StoredLayer(weights, sum(tensors[key].nbytes for key in present), present)


class Layout:
    """One storage layout (see the module docstring). Subclasses set the class attributes and
    override what their layout does; the defaults are what a layout without that step needs."""

    kind: str  # how messages name its layers: "int8", "weight-only", ...
    formats: tuple[str, ...]  # the format names it writes and reads (slimformer.json "format")
    # The `sparse_storage` value that picks this layout for a model with no quantized layer; None
    # for a quantized layout, which is picked by the layers it finds.
    float_storage: str | None = None
    # Whether transformers (with compressed-tensors), and so the tools that load through it
    # (sentence-transformers), read this layout's folders as they are.
    plain_transformers: bool = True

    # --- writing

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers of `model` this layout stores in its own tensors, by name."""
        return {}

    def replaces(self, key: str, layer: str) -> bool:
        """Whether state-dict tensor `key` belongs to stored `layer`, so that `write` writes it in
        this layout instead (default: every tensor of the layer)."""
        return key.startswith(layer + ".")

    def write(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        tensors: dict[str, torch.Tensor],
        config: dict,
    ) -> str:
        """Add the stored `layers`' tensors to `tensors` (the float ones, about to be written) and
        describe them in `config` (config.json); the format written."""
        raise NotImplementedError

    def records(self, model: nn.Module) -> dict:
        """Facts about `model`'s stored layers that slimformer.json records, for the loader."""
        return {}

    # --- reading

    def check_scheme(self, quantization: dict | None) -> str | None:
        """The format of a config.json `quantization_config` (None: there is none) stored in this
        layout; None if it is not this layout's. Raises UnsupportedModelError if it is, but this
        module cannot load it."""
        raise NotImplementedError

    def read(
        self, state: dict[str, torch.Tensor], quantization: dict, context: LoadContext
    ) -> dict[str, Any]:
        """Take the stored layers' tensors out of the loaded weights `state` (leaving what a float
        model of the architecture loads as it is); {layer name: what `build` needs}."""
        return {}

    def shape(self, stored: Any) -> tuple[int, ...]:
        """The [out, in] weight shape of one stored layer."""
        raise NotImplementedError

    def build(
        self,
        name: str,
        stored: Any,
        bias: torch.Tensor | None,
        quantization: dict,
        context: LoadContext,
    ) -> tuple[nn.Module, str]:
        """(the runtime module of one stored layer, the kernel it runs): "float: <why>" when it
        computes in float."""
        raise NotImplementedError

    # --- checking and describing

    def verify(
        self, folder: Path, quantization: dict | None, loaded: nn.Module, model: nn.Module
    ) -> dict:
        """Check the artifact in `folder` (`loaded` from it) against the in-memory `model` for this
        layout's layers, bit for bit where the layout is exact; raise ExportVerificationError if
        they differ. Entries for the verification report (none: nothing to report)."""
        return {}

    def relative_tolerance(self, kernels: dict[str, int]) -> float:
        """`verify`'s bound on |artifact - in-memory| relative to max(1, max |in-memory output|),
        for an artifact running `kernels` ({kind: layer count}). The same weights and float
        kernels give the same numbers up to op ordering."""
        return 1e-4

    def describe(
        self, quantization: dict | None, model_class: str, slimformer_load: str
    ) -> tuple[str, str]:
        """(the layout, how to load it) for the model card."""
        raise NotImplementedError

    def stored_layers(
        self, tensors: dict[str, StoredTensor], quantization: dict | None
    ) -> dict[str, StoredLayer]:
        """{layer name: its count} for every layer of an artifact in this layout (`tensors`: every
        tensor of its weight files, by name) stored in a form of its own; the other tensors hold
        one weight per element (default: none is, as in a dense folder)."""
        return {}


class QuantizedLayout(Layout):
    """A compressed-tensors quantized layout: one `quantization_config` with `config_groups` of
    {weights, input_activations} schemes, `targets` naming the layers, `ignore` the float ones."""

    def write(self, model, layers, tensors, config) -> str:
        schemes = {}
        for name, module in layers.items():
            layer_tensors, schemes[name] = self.write_layer(name, module)
            tensors.update(layer_tensors)
        return self.configure(model, layers, schemes, config)

    def configure(
        self, model: nn.Module, layers: dict[str, nn.Module], schemes: dict[str, dict], config: dict
    ) -> str:
        """Describe the stored `layers` (written with `schemes`) in `config`; the format. Apart
        from `write`, a streamed export calls it once after writing the layers block by block."""
        float_linears = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in schemes
        ]
        config["quantization_config"] = compressed_tensors_config(
            self.formats[0], schemes, float_linears
        )
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None and any(module is output for module in layers.values()):
            # The quantized head can no longer share the float embedding's tensor.
            config["tie_word_embeddings"] = False
        return self.formats[0]

    def write_layer(self, name: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """(one stored layer's tensors, its {"weights", "input_activations"} scheme)."""
        raise NotImplementedError

    def check_scheme(self, quantization: dict | None) -> str | None:
        storage_format = (quantization or {}).get("format")
        if (
            storage_format not in self.formats
            or quantization.get("quant_method") != COMPRESSED_TENSORS
        ):
            return None
        for group in quantization.get("config_groups", {}).values():
            if not all(
                isinstance(t, str) and not t.startswith("re:") for t in group.get("targets", [])
            ):
                raise UnsupportedModelError(f"unsupported targets: {group.get('targets')}")
            if not self.supports(group):
                raise UnsupportedModelError(
                    f"unsupported {storage_format} weight scheme: {group.get('weights') or {}}"
                )
        return storage_format

    def supports(self, group: dict) -> bool:
        """Whether this module loads a config group ({weights, input_activations}) of its format."""
        raise NotImplementedError


class ScaledLayout(QuantizedLayout):
    """A quantized layout that stores each layer as `<name>.weight` with a float32
    `<name>.weight_scale` (and, when its activations are static, `<name>.input_scale`)."""

    def read(self, state, quantization, context):
        """{name: (weight, weight_scale, input_scale or None)}, taken out of `state`."""
        names = sorted(
            key.removesuffix(".weight_scale") for key in state if key.endswith(".weight_scale")
        )
        return {
            name: (
                state.pop(f"{name}.weight"),
                state.pop(f"{name}.weight_scale"),
                state.pop(f"{name}.input_scale", None),
            )
            for name in names
        }

    def shape(self, stored):
        return tuple(stored[0].shape)

    def stored_layers(self, tensors, quantization):
        names = [
            key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale")
        ]
        return {
            name: stored_layer(
                tensors[f"{name}.weight"].numel,
                tensors,
                [f"{name}.{suffix}" for suffix in ("weight", "weight_scale", "input_scale")],
            )
            for name in names
        }


def quantization_args(
    *,
    kind: str,
    bits: int,
    symmetric: bool,
    strategy: str,
    observer: str | None,
    group_size: int | None = None,
    dynamic: bool = False,
) -> dict:
    """A `QuantizationArgs` of compressed-tensors' schema, every field spelled out."""
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": dynamic,
        "group_size": group_size,
        "num_bits": bits,
        "observer": observer,
        "observer_kwargs": {},
        "strategy": strategy,
        "symmetric": symmetric,
        "type": kind,
    }


def symmetric_8bit_args(kind: str, strategy: str, *, dynamic: bool = False) -> dict:
    """Symmetric 8-bit `QuantizationArgs` ("int" or "float"): computed at run time when `dynamic`,
    otherwise observed once by min/max."""
    return quantization_args(
        kind=kind,
        bits=8,
        symmetric=True,
        strategy=strategy,
        observer=None if dynamic else "minmax",
        dynamic=dynamic,
    )


def compressed_tensors_config(
    storage_format: str, schemes: dict[str, dict], float_linears: list[str]
) -> dict:
    """The `quantization_config` for quantized layers {name: {"weights": args,
    "input_activations": args or None}} stored in `storage_format`."""
    by_scheme: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        by_scheme.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    groups = {}
    for index, key in enumerate(sorted(by_scheme)):
        # One scheme covers every Linear not ignored; mixed schemes name their layers exactly.
        targets = ["Linear"] if len(by_scheme) == 1 else sorted(by_scheme[key])
        scheme = json.loads(key)
        groups[f"group_{index}"] = {
            "input_activations": scheme["input_activations"],
            "output_activations": None,
            "targets": targets,
            "weights": scheme["weights"],
        }
    return {
        "config_groups": groups,
        "format": storage_format,
        "global_compression_ratio": None,
        "ignore": sorted(float_linears),
        "kv_cache_scheme": None,
        "quant_method": COMPRESSED_TENSORS,
        "quantization_status": "compressed",
    }


def group_of(quantization: dict, name: str) -> dict:
    """The config group that targets layer `name`."""
    groups = [
        group
        for group in quantization["config_groups"].values()
        if name in group["targets"] or "Linear" in group["targets"]
    ]
    if name in quantization.get("ignore", []) or len(groups) != 1:
        raise UnsupportedModelError(f"{name} is stored quantized but no single scheme targets it")
    return groups[0]


def float_layers_text(quantization: dict) -> str:
    """The model card's sentence on the Linear layers a quantized layout left in float."""
    return (
        "Layers left in float32: "
        + (", ".join(f"`{name}`" for name in quantization.get("ignore", [])) or "none")
        + "."
    )
