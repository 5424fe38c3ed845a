"""Pruned layers stored compressed, in compressed-tensors' bitmask layouts, and read back.

A pruned layer (`sparsity.ATTRIBUTE` set, weights exact zeros) of a model that is otherwise
float is written without its dense `<name>.weight`, as:

- `sparse-bitmask` (any pattern): `<name>.compressed` the nonzero weights in row-major order (1-D,
  the weight's dtype); `<name>.bitmask` uint8 [out, ceil(in / 8)], bit j % 8 of byte j // 8 of a
  row (little-endian bit order, numpy's `packbits(..., bitorder="little")`) set where weight j is
  nonzero; `<name>.shape` int64 [2] = [out, in]; `<name>.row_offsets` int64 [out], where each
  row's values start in `compressed`.
- `sparse-24-bitmask` (every layer 2:4): the 2 kept weights of every group of 4 inputs, in order,
  as `<name>.compressed` [out, in / 2]; `<name>.bitmask` as above with exactly 2 bits set per group
  of 4; `<name>.shape` int64 [2, 1]. A group with fewer than 2 nonzeros keeps a zero or two.

config.json then holds `quantization_config = {"quant_method": "compressed-tensors",
"sparsity_config": {...}}` with no quantization, as compressed-tensors' ModelCompressor wrote it.
These are compressed-tensors' BitmaskCompressor and Sparse24BitMaskCompressor layouts (0.9 to
0.14; the bit packing is still its `utils.pack_bitmasks`). At 50% sparsity a float32 layer takes
53% of its dense size (half the values, one bit per weight, one int64 per row).

Who reads them: `load_artifact` (with `decompress_sparse_layers`, below). compressed-tensors 0.20.1
removed its sparse compressors, and transformers 5.24 ignores `sparsity_config`: it loads such a
folder with the pruned layers' weights *missing* (randomly initialised, with only a warning). Save
with `sparse_storage="dense"` for a folder that plain transformers reads: the zeros are then
stored as they are, with no `quantization_config` (the `dense` layout).

One artifact holds one format: in a quantized model the pruned layers keep their zeros inside the
quantized format (round-to-nearest maps 0 to 0 exactly) and no sparse layout is written.
"""

from __future__ import annotations

import math

import numpy
import torch
from torch import nn

from workers.compression.formats.layout import (
    COMPRESSED_TENSORS,
    ExportVerificationError,
    Layout,
    stored_layer,
)
from workers.compression.loading import UnsupportedModelError
from workers.compression.sparsity import ATTRIBUTE, follows_two_of_four

BITMASK_FORMAT = "sparse-bitmask"
TWO_FOUR_FORMAT = "sparse-24-bitmask"


class SparseBitmask(Layout):
    kind = "sparse"
    formats = (BITMASK_FORMAT, TWO_FOUR_FORMAT)
    float_storage = "bitmask"
    plain_transformers = False  # transformers 5.24 loads these layers uninitialised

    def layers(self, model):
        return {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and getattr(module, ATTRIBUTE, None) is not None
        }

    def replaces(self, key, layer):
        return False  # the weights are read back out of the float tensors in `write`

    def write(self, model, layers, tensors, config):
        """Replace the dense weight of every pruned layer by its bitmask layout; "dense" when no
        pruned layer has a weight of its own to store (one tied to the embedding is written
        there, dense)."""
        pruned = {
            name: getattr(module, ATTRIBUTE)
            for name, module in layers.items()
            if f"{name}.weight" in tensors and tensors[f"{name}.weight"].is_floating_point()
        }
        if not pruned:
            return "dense"
        two_four = all(
            pattern == "2:4" and follows_two_of_four(tensors[f"{name}.weight"])
            for name, pattern in pruned.items()
        )
        for name in pruned:
            weight = tensors.pop(f"{name}.weight")
            tensors.update(
                two_four_tensors(name, weight) if two_four else bitmask_tensors(name, weight)
            )
        zeros = sum(p.numel() - int(torch.count_nonzero(p)) for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        storage_format = TWO_FOUR_FORMAT if two_four else BITMASK_FORMAT
        config["quantization_config"] = {
            "quant_method": COMPRESSED_TENSORS,
            "sparsity_config": {
                "format": storage_format,
                "global_sparsity": round(zeros / total, 6),
                "ignore": [],
                "registry_requires_subclass": False,
                "sparsity_structure": "2:4" if two_four else "unstructured",
                "targets": sorted(pruned),
            },
        }
        return storage_format

    def check_scheme(self, quantization):
        """The sparse layout of a config.json `quantization_config` (None: it has none), or a
        refusal when this module cannot read it."""
        sparsity = (quantization or {}).get("sparsity_config") or {}
        storage_format = sparsity.get("format")
        if storage_format in (None, "dense"):
            return None
        if (
            quantization.get("quant_method") != COMPRESSED_TENSORS
            or storage_format not in self.formats
        ):
            raise UnsupportedModelError(
                f"unsupported sparsity_config: {quantization.get('quant_method')} {storage_format}"
            )
        if quantization.get("config_groups"):
            raise UnsupportedModelError(
                f"{storage_format} combined with quantization is not supported"
            )
        return storage_format

    def read(self, state, quantization, context):
        decompress_sparse_layers(state, quantization)
        return {}  # the pruned layers load as the float Linears they are

    def verify(self, folder, quantization, loaded, model):
        """The layers stored sparse load bit for bit as the in-memory model's."""
        if self.check_scheme(quantization) is None:
            return {}
        names = quantization["sparsity_config"]["targets"]
        differing = [
            name
            for name in names
            if not torch.equal(
                loaded.get_submodule(name).weight.detach().cpu(),
                model.get_submodule(name).weight.detach().cpu(),
            )
        ]
        if differing:
            raise ExportVerificationError(
                f"stored sparse weights differ from the model's: {differing}"
            )
        return {"sparse_layers_exact": len(names)} if names else {}

    def stored_layers(self, tensors, quantization):
        names = [key.removesuffix(".bitmask") for key in tensors if key.endswith(".bitmask")]
        return {
            # Pruned weights still count: the logical [out, in] is the one stored in `.shape`.
            name: stored_layer(
                math.prod(tensors[f"{name}.shape"].value().flatten().tolist()),
                tensors,
                [
                    f"{name}.{suffix}"
                    for suffix in ("compressed", "bitmask", "shape", "row_offsets")
                ],
            )
            for name in names
        }

    def describe(self, quantization, model_class, slimformer_load):
        sparsity = quantization["sparsity_config"]
        layers = len(sparsity["targets"])
        if sparsity["format"] == TWO_FOUR_FORMAT:
            kind = (
                "2:4 sparse: the 2 kept weights of every 4 inputs and a bitmask of where they sit"
            )
        else:
            kind = "sparse: the nonzero weights, a bitmask of where they sit and each row's offset"
        layout = (
            f"float32 safetensors with {layers} pruned Linear layers stored in compressed-tensors' "
            f"`{sparsity['format']}` layout ({kind}); {sparsity['global_sparsity']:.1%} of all "
            "parameters are zero."
        )
        how = (
            "With Slimformer, which expands the pruned layers to dense float weights:\n\n"
            + slimformer_load
            + "\n\ntransformers 5 with compressed-tensors 0.20 does not read sparse layouts: it would "
            f"load the pruned layers uninitialised. For plain `{model_class}.from_pretrained`, export "
            'the model with `sparse_storage="dense"` (same weights, zeros stored as they are).'
        )
        return layout, how


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)], little-endian bits within each byte."""
    return torch.from_numpy(numpy.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_mask(bitmask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    bits = numpy.unpackbits(bitmask.numpy(), axis=-1, count=shape[1], bitorder="little")
    return torch.from_numpy(bits).bool()


def bitmask_tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `sparse-bitmask` tensors of one weight [out, in] (see the module docstring)."""
    mask = weight != 0
    row_counts = mask.sum(dim=1)
    return {
        f"{name}.compressed": weight[mask],
        f"{name}.bitmask": pack_mask(mask),
        f"{name}.shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        f"{name}.row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def two_four_tensors(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `sparse-24-bitmask` tensors of one 2:4 weight [out, in] (see the module docstring).
    The kept positions are each group's 2 largest |w| (ties to the first), which include every
    nonzero since a group holds at most 2."""
    rows, cols = weight.shape
    groups = weight.abs().reshape(rows, cols // 4, 4)
    kept = torch.sort(groups, dim=2, descending=True, stable=True).indices[:, :, :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, kept, True).reshape(rows, cols)
    return {
        f"{name}.compressed": weight[mask].reshape(rows, cols // 2),
        f"{name}.bitmask": pack_mask(mask),
        f"{name}.shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
    }


def decompress_sparse_layers(state: dict[str, torch.Tensor], quantization: dict) -> None:
    """Replace, in a loaded state dict, every layer stored in a bitmask layout by its dense
    `<name>.weight`, after checking the layout."""
    storage_format = quantization["sparsity_config"]["format"]
    names = sorted(key.removesuffix(".bitmask") for key in state if key.endswith(".bitmask"))
    for name in names:
        shape = state.pop(f"{name}.shape", None)
        compressed = state.pop(f"{name}.compressed", None)
        bitmask = state.pop(f"{name}.bitmask")
        row_offsets = state.pop(f"{name}.row_offsets", None)
        two_four = storage_format == TWO_FOUR_FORMAT
        if shape is None or compressed is None or shape.numel() != 2 or shape.is_floating_point():
            raise UnsupportedModelError(f"{name}: {storage_format} layer without its shape/values")
        rows, cols = (int(size) for size in shape.flatten())
        problems = []
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
            problems.append(f"bitmask {bitmask.dtype} {tuple(bitmask.shape)}")
        else:
            mask = unpack_mask(bitmask, (rows, cols))
            expected = (rows, cols // 2) if two_four else (int(mask.sum()),)
            if tuple(compressed.shape) != expected or not compressed.is_floating_point():
                problems.append(f"values {compressed.dtype} {tuple(compressed.shape)}")
            if two_four and (cols % 4 or (mask.reshape(rows, -1, 4).sum(dim=2) != 2).any()):
                problems.append("a group of 4 without exactly 2 stored weights")
            counts = mask.sum(dim=1)
            if not two_four and (
                row_offsets is None
                or not torch.equal(row_offsets, torch.cumsum(counts, 0) - counts)
            ):
                problems.append("row_offsets")
        if problems:
            raise UnsupportedModelError(f"{name}: not a {storage_format} layer: {problems}")
        weight = torch.zeros(rows, cols, dtype=compressed.dtype)
        weight[mask] = compressed.flatten()
        state[f"{name}.weight"] = weight
