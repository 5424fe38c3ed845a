"""Weight-only 1-8 bit integers, compressed-tensors `pack-quantized` (what compressed-tensors
infers for W4A16 and W8A16).

`<name>.weight_packed` int32 [out, ceil(in * bits / 32)] holds the codes as unsigned values
(signed code + 2^(bits-1)) in one dense little-endian bit stream per row: code j occupies bits
j*bits .. j*bits+bits-1, so with 3, 5, 6 or 7 bits a code may straddle two words;
`<name>.weight_scale` float32 [out, groups]; `<name>.weight_shape` int64 [2] = [out, in]; and,
when asymmetric, `<name>.weight_zero_point` int32 [ceil(out * bits / 32), groups], the zero
points packed the same way down each column. w = (code - zero_point) * scale per group.

The layers are nn.Linear holding the dequantized weight with the codes attached (`quant.py`);
the loader builds the CPU int4 / int8 kernels of `runtime/weight_only.py` for them, or, on another
device or where no kernel fits a layer, an nn.Linear holding the exactly dequantized weight.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from workers.compression.formats.layout import (
    WEIGHTS_FILE,
    ExportVerificationError,
    QuantizedLayout,
    UnsupportedExportError,
    float_layers_text,
    group_of,
    quantization_args,
    stored_layer,
)
from workers.compression.loading import UnsupportedModelError
from workers.compression.quant import ATTRIBUTE, QuantizedWeight, dequantize
from workers.compression.runtime.weight_only import dequantized_linear, runtime_linear

_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
# verify's bound on |artifact - in-memory| relative to max(1, max |in-memory output|) when the
# artifact runs the weight-only kernels; float runs must agree to 1e-4. The kernels round
# activations, scales and zeros to bfloat16 (8 significant bits) at every Linear: that moved a tiny
# random Llama's logits by 0.15% of the largest and SmolLM2-135M's (30 blocks, 128 tokens) by 1.7%
# (int4, g64), 1.4% (int4 asymmetric) and 2.3% (int8 per channel). 5% leaves room for deeper
# models; a kernel fed a wrong layout is off by tens of percent, and the stored weights themselves
# are checked bit for bit (`verify`), so the bound need not catch a wrong code or scale.
BF16_KERNEL_TOLERANCE = 5e-2


class PackQuantized(QuantizedLayout):
    kind = "weight-only"
    formats = ("pack-quantized",)

    def layers(self, model):
        return {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and getattr(module, ATTRIBUTE, None) is not None
        }

    def replaces(self, key, layer):
        return key == f"{layer}.weight"  # the dequantized copy; the bias stays as it is

    def write_layer(self, name, module):
        quant = getattr(module, ATTRIBUTE)
        per_channel = quant.scale.shape[1] == 1
        weights = quantization_args(
            kind="int",
            bits=quant.bits,
            symmetric=quant.symmetric,
            strategy="channel" if per_channel else "group",
            group_size=None if per_channel else quant.group_size,
            observer=None,
        )
        tensors = packed_weight_tensors(name, quant, module.weight.shape)
        return tensors, {"weights": weights, "input_activations": None}

    def supports(self, group):
        weights = group.get("weights") or {}
        group_size = weights.get("group_size")
        return (
            weights.get("type") == "int"
            and weights.get("num_bits") in range(1, 9)
            and isinstance(weights.get("symmetric"), bool)
            and not weights.get("dynamic")
            and group.get("input_activations") is None
            and (
                (weights.get("strategy") == "channel" and group_size in (None, -1))
                or (
                    weights.get("strategy") == "group"
                    and isinstance(group_size, int)
                    and group_size > 0
                )
            )
        )

    def read(self, state, quantization, context):
        return read_packed_layers(state, quantization)

    def shape(self, stored):
        return tuple(stored.codes.shape)

    def build(self, name, stored, bias, quantization, context):
        if context.device.type == "cpu":
            return runtime_linear(stored, bias)
        return (
            dequantized_linear(stored, bias),
            f"float: the weight-only kernels here are CPU ones, not {context.device.type}",
        )

    def verify(self, folder, quantization, loaded, model):
        """Every weight-only layer of `model` is stored packed, and its codes dequantize to
        exactly its in-memory weight."""
        in_memory = {name: module.weight for name, module in self.layers(model).items()}
        if (quantization or {}).get("format") not in self.formats:
            if in_memory:
                raise ExportVerificationError(
                    f"{len(in_memory)} weight-only layers were not packed"
                )
            return {}
        with safe_open(Path(folder) / WEIGHTS_FILE, "pt") as weights:
            state = {
                key: weights.get_tensor(key)
                for key in weights.keys()  # noqa: SIM118 (safe_open is not a mapping)
                if key.rsplit(".", 1)[-1] in _PACKED_SUFFIXES
            }
        stored = read_packed_layers(state, quantization)
        if set(stored) != set(in_memory):
            raise ExportVerificationError(
                f"packed layers {sorted(set(stored) ^ set(in_memory))[:5]} differ from the model's"
            )
        differing = [
            name
            for name, layer in stored.items()
            if not torch.equal(
                dequantize(layer).to(in_memory[name].dtype), in_memory[name].detach().cpu()
            )
        ]
        if differing:
            raise ExportVerificationError(
                f"stored codes do not dequantize to the model's weights in {differing[:5]}"
            )
        return {"weights_exact_layers": len(stored)} if stored else {}

    def stored_layers(self, tensors, quantization):
        names = [
            key.removesuffix(".weight_shape") for key in tensors if key.endswith(".weight_shape")
        ]
        return {
            # The codes are packed, so the logical [out, in] is the one stored in weight_shape.
            name: stored_layer(
                math.prod(tensors[f"{name}.weight_shape"].value().tolist()),
                tensors,
                [f"{name}.{suffix}" for suffix in _PACKED_SUFFIXES],
            )
            for name in names
        }

    def relative_tolerance(self, kernels):
        if kernels.get("int4") or kernels.get("int8"):
            return BF16_KERNEL_TOLERANCE
        return super().relative_tolerance(kernels)

    def describe(self, quantization, model_class, slimformer_load):
        schemes = [group["weights"] for group in quantization["config_groups"].values()]
        described = sorted(
            {
                f"{weights['num_bits']}-bit {'' if weights['symmetric'] else 'a'}symmetric, "
                + (
                    "one scale per output channel"
                    if weights["strategy"] == "channel"
                    else f"one scale per {weights['group_size']} input channels"
                )
                for weights in schemes
            }
        )
        symmetric = all(weights["symmetric"] for weights in schemes)
        layout = (
            f"compressed-tensors `pack-quantized`: weight-only integers ({'; '.join(described)}) "
            "packed into int32 `weight_packed`, with float32 `weight_scale`"
            + ("" if symmetric else " and packed `weight_zero_point`")
            + "; activations stay in float. "
            + float_layers_text(quantization)
        )
        if symmetric:
            transformers_load = (
                f"```python\nfrom transformers import {model_class}\n\n"
                f'model = {model_class}.from_pretrained("path/to/this/folder")\n```'
            )
        else:
            # transformers 5.24 + compressed-tensors 0.20.1 mis-shape packed zero points when
            # loading compressed; dequantizing at load time reads them correctly.
            transformers_load = (
                f"```python\nfrom transformers import {model_class}, CompressedTensorsConfig\n\n"
                f"model = {model_class}.from_pretrained(\n"
                '    "path/to/this/folder",\n'
                "    quantization_config=CompressedTensorsConfig(dequantize=True),\n"
                ")\n```"
            )
        how = (
            "transformers (with the `compressed-tensors` package installed) dequantizes the "
            "weights to float:\n\n"
            + transformers_load
            + "\n\nvLLM's compressed-tensors support reads the same layout (W4A16 / W8A16). "
            "With Slimformer on CPU the weights stay in int4 / int8 and run PyTorch's weight-only "
            "kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`, bfloat16 "
            "activations):\n\n" + slimformer_load
        )
        return layout, how


def packed_weight_tensors(
    name: str, quant: QuantizedWeight, shape: torch.Size
) -> dict[str, torch.Tensor]:
    """The `pack-quantized` tensors of one weight-only layer (see the module docstring), after
    checking that its codes, scales and zero points are what their bit width and shape promise:
    a wrong range would be packed silently into neighbouring codes."""
    codes, scale, bits = quant.codes.cpu(), quant.scale.cpu(), quant.bits
    zero_point = None if quant.zero_point is None else quant.zero_point.cpu()
    out_features, in_features = shape
    groups = scale.shape[1] if scale.dim() == 2 else 0
    problems = []
    if not 1 <= bits <= 8:
        problems.append(f"{bits} bits (pack-quantized holds 1 to 8)")
    if tuple(codes.shape) != (out_features, in_features):
        problems.append(f"codes {tuple(codes.shape)} for a weight {tuple(shape)}")
    if groups == 0 or tuple(scale.shape) != (out_features, groups) or in_features % groups:
        problems.append(f"scale {tuple(scale.shape)} does not split {in_features} inputs evenly")
    elif quant.group_size != in_features // groups:
        problems.append(f"group_size {quant.group_size} with {groups} groups of {in_features}")
    if (zero_point is None) != bool(quant.symmetric):
        problems.append("a zero point must be given exactly when asymmetric")
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if quant.symmetric else (0, 2**bits - 1)
    if codes.numel() and not (low <= codes.min().item() and codes.max().item() <= high):
        problems.append(f"codes outside [{low}, {high}]")
    if zero_point is not None and (
        zero_point.shape != scale.shape
        or zero_point.min().item() < 0
        or zero_point.max().item() > 2**bits - 1
    ):
        problems.append(f"zero points not in [0, {2**bits - 1}] with the scale's shape")
    if problems:
        raise UnsupportedExportError(f"{name}: cannot pack its weights: {'; '.join(problems)}")

    # Codes are stored unsigned: compressed-tensors' signed code plus 2^(bits-1). Its asymmetric
    # codes and zero points are ours minus 2^(bits-1), so ours are stored as they are.
    offset = 1 << (bits - 1) if zero_point is None else 0
    tensors = {
        f"{name}.weight_packed": pack_int32(codes, bits, offset=offset),
        f"{name}.weight_scale": scale.float(),
        f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if zero_point is not None:
        # Packed down the output dimension: [ceil(out * bits / 32), groups].
        tensors[f"{name}.weight_zero_point"] = pack_int32(zero_point.T, bits).T
    return tensors


def pack_int32(values: torch.Tensor, bits: int, *, offset: int = 0) -> torch.Tensor:
    """Pack unsigned `bits`-bit values [rows, cols] (`values + offset`: the caller's signed codes
    plus 2^(bits-1)) into int32 [rows, ceil(cols * bits / 32)] as compressed-tensors does: value j
    of a row occupies bits j*bits .. j*bits+bits-1 of the row's little-endian bit stream (word
    j*bits // 32, from bit j*bits % 32 up). Rows are packed a slice at a time (`_rows_per_slice`):
    the int64 working tensors are a few MB, not 8 bytes for each value of the layer."""
    rows, cols = values.shape
    words = math.ceil(cols * bits / 32)
    start = torch.arange(cols) * bits
    word, shift = start // 32, start % 32
    packed = torch.empty(rows, words, dtype=torch.int32)
    step = _rows_per_slice(cols)
    for first in range(0, rows, step):
        chunk = values[first : first + step].long() + offset
        # Shifted values land in their word; bits past 32 are carried to the next word below.
        # The values' bit ranges are disjoint, so adding them is OR-ing them.
        stream = torch.zeros(chunk.shape[0], words + 1, dtype=torch.int64)
        stream.index_add_(1, word, chunk << shift)
        carried = stream & 0xFFFFFFFF
        carried[:, 1:] += stream[:, :-1] >> 32
        part = carried[:, :words]
        packed[first : first + step] = torch.where(part >= 2**31, part - 2**32, part)
    return packed


def unpack_int32(
    packed: torch.Tensor,
    bits: int,
    cols: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """The inverse of `pack_int32`: the unsigned values [rows, cols] minus `offset`, as `dtype`
    (which must hold them: int8 codes are written straight into int8, never held as int64 whole).
    Unpacked a slice of rows at a time, as `pack_int32` packs."""
    rows = packed.shape[0]
    start = torch.arange(cols) * bits
    word, shift = start // 32, start % 32
    mask = (1 << bits) - 1
    values = torch.empty(rows, cols, dtype=dtype)
    step = _rows_per_slice(cols)
    for first in range(0, rows, step):
        words = torch.nn.functional.pad(packed[first : first + step].long() & 0xFFFFFFFF, (0, 1))
        low = words[:, word] >> shift
        high = words[:, word + 1] << (32 - shift)  # the part of a value straddling into word + 1
        values[first : first + step] = ((low | high) & mask) - offset
    return values


def _rows_per_slice(cols: int) -> int:
    """Rows of a layer packed or unpacked at once: about 1M values (8 MB per int64 tensor)."""
    return max(1, (1 << 20) // max(1, cols))


def read_packed_layers(
    state: dict[str, torch.Tensor], quantization: dict
) -> dict[str, QuantizedWeight]:
    """Take every `pack-quantized` layer's tensors out of `state` and unpack them to codes in the
    engine's convention (symmetric: signed; asymmetric: unsigned, with unsigned zero points)."""
    names = sorted(
        key.removesuffix(".weight_packed") for key in state if key.endswith(".weight_packed")
    )
    layers = {}
    for name in names:
        weights = group_of(quantization, name)["weights"]
        bits, symmetric = weights["num_bits"], weights["symmetric"]
        out_features, in_features = state.pop(f"{name}.weight_shape").tolist()
        packed = state.pop(f"{name}.weight_packed")
        scale = state.pop(f"{name}.weight_scale").float()
        groups = 1 if weights["strategy"] == "channel" else in_features // weights["group_size"]
        expected = {
            "weight_packed": (out_features, math.ceil(in_features * bits / 32)),
            "weight_scale": (out_features, groups),
        }
        zero_point = None
        if not symmetric:
            zero_point = state.pop(f"{name}.weight_zero_point", None)
            expected["weight_zero_point"] = (math.ceil(out_features * bits / 32), groups)
        found = {
            "weight_packed": packed,
            "weight_scale": scale,
            "weight_zero_point": zero_point,
        }
        wrong = [
            f"{key} {None if found[key] is None else tuple(found[key].shape)}, expected {shape}"
            for key, shape in expected.items()
            if found[key] is None or tuple(found[key].shape) != shape
        ]
        if wrong or packed.dtype != torch.int32 or in_features % groups:
            raise UnsupportedModelError(f"{name}: not a {bits}-bit packed layer: {wrong}")
        if symmetric:
            codes = unpack_int32(
                packed, bits, in_features, offset=1 << (bits - 1), dtype=torch.int8
            )
        else:
            codes = unpack_int32(packed, bits, in_features, dtype=torch.uint8)
            zero_point = unpack_int32(zero_point.T, bits, out_features, dtype=torch.uint8).T
        layers[name] = QuantizedWeight(
            codes=codes,
            scale=scale,
            zero_point=zero_point,
            bits=bits,
            group_size=in_features // groups,
            symmetric=symmetric,
        )
    return layers
