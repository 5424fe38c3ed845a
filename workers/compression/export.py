"""Writing compressed models as folders people can load, and proving that they load.

A dense model is a standard Hugging Face folder. Quantized models use the compressed-tensors
layouts that transformers (with the compressed-tensors package) and vLLM read, with a
`quantization_config` in config.json describing the scheme:

- int8 weights and activations (`int-quantized`): `<name>.weight` holds the int8 values and
  `<name>.weight_scale` the float32 scales ([out, 1] per channel, [1] per tensor); no zero points
  (symmetric); activations are quantized per token at run time, or with the calibrated
  `<name>.input_scale` [1] when static (w8a8).
- weight-only 2-8 bit (`pack-quantized`, what compressed-tensors infers for W4A16 and W8A16):
  `<name>.weight_packed` int32 [out, ceil(in * bits / 32)] holds the codes as unsigned values
  (signed code + 2^(bits-1)) in one dense little-endian bit stream per row: code j occupies bits
  j*bits .. j*bits+bits-1, so with 3, 5, 6 or 7 bits a code may straddle two words;
  `<name>.weight_scale` float32 [out, groups]; `<name>.weight_shape` int64 [2] = [out, in]; and,
  when asymmetric, `<name>.weight_zero_point` int32 [ceil(out * bits / 32), groups], the zero
  points packed the same way down each column. w = (code - zero_point) * scale per group.

`load_artifact` reads these folders back into a runnable model without compressed-tensors: torch's
dynamic int8 Linear for the first, the CPU int4/int8 kernels of `runtime.py` for the second.
One artifact holds one format; a model mixing dynamic int8 and weight-only layers is refused.

Bytes are deterministic: tensors, config and metadata depend only on the model and the arguments
(no timestamps, JSON keys sorted), and the folder appears by one rename once every file is written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import platform
import shutil
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
from safetensors import safe_open
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from workers.compression.loading import (
    LoadedModel,
    UnsupportedModelError,
    load_model,
    load_tokenizer,
    publish_folder,
    read_architecture,
    task_of,
)
from workers.compression.methods.dynamic_int8 import int8_linear, int8_weight_and_scale
from workers.compression.methods.fp8 import Fp8Linear, fp8_matmul_available
from workers.compression.methods.w8a8 import W8A8Linear
from workers.compression.quant import ATTRIBUTE, QuantizedWeight, dequantize
from workers.compression.runtime import dequantized_linear, runtime_linear
from workers.compression.sparse_export import (
    decompress_sparse_layers,
    model_card_text,
    sparse_layer_mismatches,
    sparse_storage_format,
    sparse_weight_tensors,
)

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "slimformer.json"
INT8_FORMAT = "int-quantized"
PACKED_FORMAT = "pack-quantized"
FLOAT_FORMAT = "float-quantized"
# verify_export's bound on |artifact - in-memory| relative to max(1, max |in-memory output|) when
# the artifact runs the weight-only kernels; float and int8-dynamic runs must agree to 1e-4. The
# kernels round activations, scales and zeros to bfloat16 (8 significant bits) at every Linear:
# that moved a tiny random Llama's logits by 0.15% of the largest and SmolLM2-135M's (30 blocks,
# 128 tokens) by 1.7% (int4, g64), 1.4% (int4 asymmetric) and 2.3% (int8 per channel). 5% leaves
# room for deeper models; a kernel fed a wrong layout is off by tens of percent, and the stored
# weights themselves are checked bit for bit, so the bound need not catch a wrong code or scale.
BF16_KERNEL_TOLERANCE = 5e-2

log = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """The written artifact does not reproduce the model it was written from."""


class UnsupportedExportError(ValueError):
    """The model holds layers that no single compressed-tensors format can store."""


def save_model(
    loaded: LoadedModel,
    model: nn.Module,
    folder: Path,
    *,
    recipe: dict,
    metrics: dict,
    inputs: dict,
    versions: dict | None = None,
    sparse_storage: str = "bitmask",
) -> list[Path]:
    """Write `model` (the compressed form of `loaded`) to `folder`, which must not exist yet or be
    empty. Returns the files written, sorted. Pruned layers of a float model are stored in a
    compressed-tensors bitmask layout (`sparse_storage="bitmask"`, smaller; `sparse_export.py`)
    or as dense weights with their zeros (`"dense"`, what plain transformers can read)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors, storage_format, schemes = _weight_tensors(model)
    sparsity_config = sparse_weight_tensors(tensors, model, storage=sparse_storage)
    config = json.loads(model.config.to_json_string())  # what save_pretrained writes
    config.pop("quantization_config", None)
    config["architectures"] = [loaded.architecture]  # as save_pretrained records it
    if schemes:
        float_linears = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in schemes
        ]
        config["quantization_config"] = compressed_tensors_config(
            storage_format, schemes, float_linears
        )
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None and (
            isinstance(output, nnqd.Linear | W8A8Linear | Fp8Linear)
            or _weight_quant(output) is not None
        ):
            # The quantized head can no longer share the float embedding's tensor.
            config["tie_word_embeddings"] = False

    if sparsity_config is not None:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "sparsity_config": sparsity_config,
        }
        storage_format = sparsity_config["format"]

    temporary = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent)
    )
    try:
        safetensors.torch.save_file(tensors, temporary / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_json(temporary / "config.json", config)
        if loaded.task == "causal-lm" and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        loaded.tokenizer.save_pretrained(temporary)
        versions = versions if versions is not None else library_versions()
        (temporary / "README.md").write_text(
            model_card(loaded, config, recipe=recipe, metrics=metrics, inputs=inputs),
            encoding="utf-8",
        )
        files = {
            path.relative_to(temporary).as_posix(): _sha256(path)
            for path in sorted(temporary.rglob("*"))
            if path.is_file()
        }
        _write_json(
            temporary / METADATA_FILE,
            {
                "format": storage_format,
                "architecture": loaded.architecture,
                "task": loaded.task,
                "recipe": recipe,
                "metrics": metrics,
                "inputs": inputs,
                "versions": versions,
                # Which int8 layers run torch's per-tensor dynamic kernels (dynamic_int8) rather
                # than per-token activations (w8a8): the file format does not tell them apart.
                "torch_dynamic_int8_layers": sorted(
                    name for name, m in model.named_modules() if isinstance(m, nnqd.Linear)
                ),
                "files": files,
            },
        )
        publish_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return sorted(path for path in folder.rglob("*") if path.is_file())


def update_metadata(
    loaded: LoadedModel, folder: Path, *, recipe: dict, metrics: dict, inputs: dict
) -> None:
    """Rewrite a saved folder's model card and `slimformer.json` with new metrics (they are known
    only after the saved folder has been measured) without writing the weights again."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    (folder / "README.md").write_text(
        model_card(loaded, config, recipe=recipe, metrics=metrics, inputs=inputs),
        encoding="utf-8",
    )
    metadata.update(recipe=recipe, metrics=metrics, inputs=inputs)
    metadata["files"] = {
        path.relative_to(folder).as_posix(): _sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != METADATA_FILE
    }
    _write_json(folder / METADATA_FILE, metadata)


def _weight_quant(module: nn.Module):
    """The weight-only quantization a stage attached to this Linear, or None."""
    return getattr(module, ATTRIBUTE, None) if isinstance(module, nn.Linear) else None


def _weight_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], str, dict[str, dict]]:
    """(tensors to write, storage format, {quantized layer name: its weights scheme}). Tied
    weights are written once, under the name transformers expects (the embedding), as
    `save_pretrained` does."""
    int8_modules = {
        n: m for n, m in model.named_modules() if isinstance(m, nnqd.Linear | W8A8Linear)
    }
    fp8_modules = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    weight_only = {
        name: quant
        for name, module in model.named_modules()
        if (quant := _weight_quant(module)) is not None
    }
    kinds = {
        kind: sorted(layers)[0]
        for kind, layers in (
            ("int8", int8_modules),
            ("fp8", fp8_modules),
            ("weight-only", weight_only),
        )
        if layers
    }
    if len(kinds) > 1:
        raise UnsupportedExportError(
            "the model mixes "
            + " and ".join(f"{kind} layers (e.g. {name})" for kind, name in kinds.items())
            + ": one artifact holds one compressed-tensors format; quantize with one of them"
        )
    replaced = {**int8_modules, **fp8_modules}
    tensors = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if any(owner == name or owner.startswith(name + ".") for name in replaced):
            continue  # quantized layers' tensors; written below in the compressed-tensors layout
        if key.endswith(".weight") and owner in weight_only:
            continue  # the dequantized copy; the codes are written below
        tensors[key] = value
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        tied = target in tensors and source in tensors
        if tied and tensors[target].data_ptr() == tensors[source].data_ptr():
            del tensors[target]
    schemes = {}
    for name, module in int8_modules.items():
        if isinstance(module, W8A8Linear):
            q, scale, bias = module.weight, module.weight_scale, module.bias
            if not module.dynamic:
                tensors[f"{name}.input_scale"] = module.input_scale
            activations = _DYNAMIC_INT8_ACTIVATIONS if module.dynamic else _STATIC_INT8_ACTIVATIONS
        else:
            q, scale = int8_weight_and_scale(module)
            bias, activations = module.bias(), _DYNAMIC_INT8_ACTIVATIONS
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = scale
        if bias is not None:
            tensors[f"{name}.bias"] = bias
        strategy = "channel" if scale.dim() == 2 else "tensor"  # [out, 1] or [1]
        schemes[name] = {
            "weights": _weights_args(
                bits=8, symmetric=True, strategy=strategy, group_size=None, observer="minmax"
            ),
            "input_activations": activations,
        }
    for name, module in fp8_modules.items():
        tensors[f"{name}.weight"] = module.weight
        tensors[f"{name}.weight_scale"] = module.weight_scale
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias
        schemes[name] = {
            "weights": {**_FP8_ARGS, "dynamic": False, "observer": "minmax", "strategy": "channel"},
            "input_activations": _FP8_ARGS if module.dynamic_activations else None,
        }
    for name, quant in weight_only.items():
        tensors.update(packed_weight_tensors(name, quant, model.get_submodule(name).weight.shape))
        per_channel = quant.scale.shape[1] == 1
        schemes[name] = {
            "weights": _weights_args(
                bits=quant.bits,
                symmetric=quant.symmetric,
                strategy="channel" if per_channel else "group",
                group_size=None if per_channel else quant.group_size,
                observer=None,
            ),
            "input_activations": None,
        }
    storage_format = (
        INT8_FORMAT
        if int8_modules
        else FLOAT_FORMAT
        if fp8_modules
        else PACKED_FORMAT
        if weight_only
        else "dense"
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return tensors, storage_format, schemes


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
    unsigned = codes.long() + (1 << (bits - 1)) if zero_point is None else codes.long()
    tensors = {
        f"{name}.weight_packed": pack_int32(unsigned, bits),
        f"{name}.weight_scale": scale.float(),
        f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if zero_point is not None:
        # Packed down the output dimension: [ceil(out * bits / 32), groups].
        tensors[f"{name}.weight_zero_point"] = pack_int32(zero_point.long().T, bits).T
    return tensors


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit values [rows, cols] into int32 [rows, ceil(cols * bits / 32)] as
    compressed-tensors does: value j of a row occupies bits j*bits .. j*bits+bits-1 of the row's
    little-endian bit stream (word j*bits // 32, from bit j*bits % 32 up)."""
    rows, cols = values.shape
    words = math.ceil(cols * bits / 32)
    start = torch.arange(cols) * bits
    # Shifted values land in their word; bits past 32 are carried to the next word below. The
    # values' bit ranges are disjoint, so adding them is OR-ing them.
    stream = torch.zeros(rows, words + 1, dtype=torch.int64)
    stream.index_add_(1, start // 32, values.long() << (start % 32))
    carried = stream & 0xFFFFFFFF
    carried[:, 1:] += stream[:, :-1] >> 32
    packed = carried[:, :words]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack_int32`: unsigned int64 values [rows, cols]."""
    words = torch.nn.functional.pad(packed.long() & 0xFFFFFFFF, (0, 1))
    start = torch.arange(cols) * bits
    word, offset = start // 32, start % 32
    low = words[:, word] >> offset
    high = words[:, word + 1] << (32 - offset)  # the part of a value that straddles into word + 1
    return (low | high) & ((1 << bits) - 1)


def _weights_args(
    *, bits: int, symmetric: bool, strategy: str, group_size: int | None, observer: str | None
) -> dict:
    """A weights `QuantizationArgs` of compressed-tensors' schema, every field spelled out."""
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": group_size,
        "num_bits": bits,
        "observer": observer,
        "observer_kwargs": {},
        "strategy": strategy,
        "symmetric": symmetric,
        "type": "int",
    }


# Dynamic int8: activations quantized to int8 per token on the fly (vLLM; Slimformer's CPU runtime
# does that for w8a8 layers, and uses torch's per-tensor dynamic kernels for dynamic_int8 layers).
_DYNAMIC_INT8_ACTIVATIONS = {
    "actorder": None,
    "block_structure": None,
    "dynamic": True,
    "group_size": None,
    "num_bits": 8,
    "observer": None,
    "observer_kwargs": {},
    "strategy": "token",
    "symmetric": True,
    "type": "int",
}
# FP8 (E4M3) per token, computed at run time; with "channel" and not dynamic, FP8 weights.
_FP8_ARGS = {**_DYNAMIC_INT8_ACTIVATIONS, "type": "float"}
# Static int8: one calibrated scale per layer input (`<name>.input_scale`).
_STATIC_INT8_ACTIVATIONS = {
    **_DYNAMIC_INT8_ACTIVATIONS,
    "dynamic": False,
    "observer": "minmax",
    "strategy": "tensor",
}


def compressed_tensors_config(
    storage_format: str, schemes: dict[str, dict], float_linears: list[str]
) -> dict:
    """The `quantization_config` for quantized layers {name: {"weights": args,
    "input_activations": args or None}} stored in `storage_format`: int8 weights with int8
    activations (`int-quantized`) or weight-only (`pack-quantized`, activations stay float)."""
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
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def load_artifact(folder: Path, *, device: torch.device | str | None = None) -> LoadedModel:
    """Load any folder `save_model` writes. Dense ones load as transformers loads them (on
    `device`, default `select_device()`). Quantized ones are built as the float architecture from
    config.json with a runtime module in place of every quantized layer (default device: CPU):
    for `int-quantized`, `W8A8Linear` (int8 x int8 products; per-token or static activation
    scales as stored) or, for the layers `slimformer.json` lists as dynamic_int8's, torch's
    dynamic int8 Linear (CPU only); for `pack-quantized`, the CPU int4
    or int8 weight-only kernels of `runtime.py`, or, on another device or where no kernel fits a
    layer, an nn.Linear holding the exactly dequantized weight. `model.slimformer_runtime` says
    what runs: {"kernels": {kind: layer count}, "fallbacks": {layer: why it runs in float}}.
    Safetensors only."""
    folder = Path(folder)
    config_data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantization = config_data.get("quantization_config")
    if quantization is None:
        return load_model(folder, device=device)
    storage_format = _check_scheme(quantization)
    device = torch.device(device if device is not None else "cpu")
    per_tensor_dynamic = set(_read_metadata(folder).get("torch_dynamic_int8_layers", []))
    if per_tensor_dynamic and device.type != "cpu":
        raise ValueError("dynamic int8 models run on CPU only")

    architecture = read_architecture(folder)
    task = task_of(architecture)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    # Build the plain float architecture; the quantized layers go in below.
    del config.quantization_config
    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    model = model_class.from_config(config, dtype=torch.float32)

    state = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    decompress_sparse_layers(state, quantization)
    if storage_format in (INT8_FORMAT, FLOAT_FORMAT):
        names = sorted(
            key.removesuffix(".weight_scale") for key in state if key.endswith(".weight_scale")
        )
        layers = {
            name: (
                state.pop(f"{name}.weight"),
                state.pop(f"{name}.weight_scale"),
                state.pop(f"{name}.input_scale", None),
            )
            for name in names
        }

    else:
        layers = read_packed_layers(state, quantization)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "all_tied_weights_keys", {})
    absent = [
        key
        for key in missing
        if key.removesuffix(".weight") not in layers and not (key in tied and tied[key] in state)
    ]
    if unexpected or absent:
        raise UnsupportedModelError(
            f"weights do not match {architecture}: "
            f"unexpected {unexpected[:5]}, missing {absent[:5]}"
        )
    runtime: dict = {"kernels": {}, "fallbacks": {}}
    for name, stored in layers.items():
        linear = model.get_submodule(name)
        shape = tuple(stored.codes.shape if storage_format == PACKED_FORMAT else stored[0].shape)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != shape:
            raise UnsupportedModelError(f"{name} is not a Linear of shape {shape}")
        if storage_format == INT8_FORMAT and name in per_tensor_dynamic:
            module, kernel = int8_linear(*stored[:2], linear.bias), "dynamic-int8"
        elif storage_format == INT8_FORMAT:
            weight, weight_scale, input_scale = stored
            module = W8A8Linear(weight, weight_scale, input_scale, linear.bias)
            kernel = "w8a8-dynamic" if input_scale is None else "w8a8-static"
        elif storage_format == FLOAT_FORMAT:
            dynamic = _group_of(quantization, name).get("input_activations") is not None
            module = Fp8Linear(*stored[:2], linear.bias, dynamic_activations=dynamic)
            kernel = (
                "fp8"
                if dynamic and fp8_matmul_available(device)
                else "float: FP8 values computed in float (no FP8 matrix multiply "
                + ("for weight-only FP8)" if not dynamic else f"on {device.type})")
            )
        elif device.type == "cpu":
            module, kernel = runtime_linear(stored, linear.bias)
        else:
            module = dequantized_linear(stored, linear.bias)
            kernel = f"float: the weight-only kernels here are CPU ones, not {device.type}"
        if kernel.startswith("float: "):
            runtime["fallbacks"][name] = kernel.removeprefix("float: ")
            kernel = "float"
        runtime["kernels"][kernel] = runtime["kernels"].get(kernel, 0) + 1
        model.set_submodule(name, module)
    if runtime["fallbacks"]:
        log.warning(
            "%d of %d quantized layers run dequantized in float: %s",
            len(runtime["fallbacks"]),
            len(layers),
            runtime["fallbacks"],
        )
    model.to(device).eval()
    model.slimformer_runtime = runtime
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(folder, task),
        task=task,
        architecture=architecture,
        folder=folder,
    )


def _read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


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
        weights = _scheme_of(quantization, name)
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
        unsigned = unpack_int32(packed, bits, in_features)
        if symmetric:
            codes = (unsigned - (1 << (bits - 1))).to(torch.int8)
        else:
            codes = unsigned.to(torch.uint8)
            zero_point = unpack_int32(zero_point.T, bits, out_features).T.to(torch.uint8)
        layers[name] = QuantizedWeight(
            codes=codes,
            scale=scale,
            zero_point=zero_point,
            bits=bits,
            group_size=in_features // groups,
            symmetric=symmetric,
        )
    return layers


def _group_of(quantization: dict, name: str) -> dict:
    """The config group that targets layer `name`."""
    groups = [
        group
        for group in quantization["config_groups"].values()
        if name in group["targets"] or "Linear" in group["targets"]
    ]
    if name in quantization.get("ignore", []) or len(groups) != 1:
        raise UnsupportedModelError(f"{name} is stored quantized but no single scheme targets it")
    return groups[0]


def _scheme_of(quantization: dict, name: str) -> dict:
    """The weights scheme of the config group that targets layer `name`."""
    return _group_of(quantization, name)["weights"]


def _int8_activations_supported(activations: dict | None) -> bool:
    """Symmetric int8 activations, per token at run time or one static scale per tensor."""
    return (
        activations is not None
        and activations.get("type") == "int"
        and activations.get("num_bits") == 8
        and activations.get("symmetric") is True
        and (activations.get("dynamic"), activations.get("strategy"))
        in ((True, "token"), (False, "tensor"))
    )


def _check_scheme(quantization: dict) -> str:
    """The storage format of a `quantization_config` this module can load, or a refusal."""
    sparse_format = sparse_storage_format(quantization)
    if sparse_format is not None:
        return sparse_format
    storage_format = quantization.get("format")
    if quantization.get("quant_method") != "compressed-tensors" or storage_format not in (
        INT8_FORMAT,
        PACKED_FORMAT,
        FLOAT_FORMAT,
    ):
        raise UnsupportedModelError(
            f"unsupported quantization_config: {quantization.get('quant_method')} {storage_format}"
        )
    for group in quantization.get("config_groups", {}).values():
        weights = group.get("weights") or {}
        if not all(
            isinstance(t, str) and not t.startswith("re:") for t in group.get("targets", [])
        ):
            raise UnsupportedModelError(f"unsupported targets: {group.get('targets')}")
        if storage_format == FLOAT_FORMAT:
            activations = group.get("input_activations")
            supported = (
                (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
                == ("float", 8, "channel")
                and weights.get("symmetric") is True
                and not weights.get("dynamic")
                and (
                    activations is None
                    or (activations.get("type"), activations.get("num_bits")) == ("float", 8)
                    and (activations.get("dynamic"), activations.get("strategy")) == (True, "token")
                )
            )
        elif storage_format == INT8_FORMAT:
            supported = (
                weights.get("num_bits") == 8
                and weights.get("type") == "int"
                and weights.get("symmetric") is True
                and weights.get("strategy") in ("channel", "tensor")
                and _int8_activations_supported(group.get("input_activations"))
            )
        else:
            group_size = weights.get("group_size")
            supported = (
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
        if not supported:
            raise UnsupportedModelError(f"unsupported {storage_format} weight scheme: {weights}")
    return storage_format


def verify_export(
    folder: Path, model_in_memory: nn.Module, loaded_task: str, sample_input_ids: torch.Tensor
) -> dict:
    """Load the artifact the documented way and check it computes what the model in memory does,
    and that every weight-only layer's stored codes dequantize to exactly its in-memory weight.
    Raises ExportVerificationError if not; returns the comparison otherwise."""
    device = next(model_in_memory.parameters()).device
    artifact = load_artifact(folder, device=device)
    exact_layers = _check_stored_weights(folder, model_in_memory)
    sparse_layers, differing = sparse_layer_mismatches(folder, artifact.model, model_in_memory)
    if differing:
        raise ExportVerificationError(f"stored sparse weights differ from the model's: {differing}")
    ids = sample_input_ids.to(device)
    with torch.inference_mode():
        expected = _outputs(model_in_memory, loaded_task, ids)
        actual = _outputs(artifact.model, loaded_task, ids)
    max_abs_diff = (expected - actual).abs().max().item()
    cosine = F.cosine_similarity(
        expected.double().flatten(), actual.double().flatten(), dim=0
    ).item()
    runtime = getattr(artifact.model, "slimformer_runtime", None)
    kernels = (runtime or {}).get("kernels", {})
    # Same weights and float kernels give the same numbers up to op ordering; the weight-only
    # kernels compute with bfloat16 activations (see BF16_KERNEL_TOLERANCE).
    relative = BF16_KERNEL_TOLERANCE if kernels.get("int4") or kernels.get("int8") else 1e-4
    tolerance = relative * max(1.0, expected.abs().max().item())
    report = {
        "max_abs_diff": max_abs_diff,
        "cosine": cosine,
        "tolerance": tolerance,
        "loaded_as": type(artifact.model).__name__,
    }
    if runtime is not None:
        report["runtime"] = runtime
    if exact_layers:
        report["weights_exact_layers"] = exact_layers
    if sparse_layers:
        report["sparse_layers_exact"] = sparse_layers
    if not max_abs_diff <= tolerance:  # also catches NaN
        raise ExportVerificationError(f"exported model disagrees with the original: {report}")
    return report


def _check_stored_weights(folder: Path, model: nn.Module) -> int:
    """How many weight-only layers the artifact stores, after checking that they are exactly the
    model's weight-only layers and dequantize to exactly its weights."""
    in_memory = {
        name: module.weight
        for name, module in model.named_modules()
        if _weight_quant(module) is not None
    }
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    if quantization.get("format") != PACKED_FORMAT:
        if in_memory:
            raise ExportVerificationError(f"{len(in_memory)} weight-only layers were not packed")
        return 0
    with safe_open(folder / WEIGHTS_FILE, "pt") as weights:
        state = {
            key: weights.get_tensor(key)
            for key in weights.keys()  # noqa: SIM118 (safe_open is not a mapping)
            if key.rsplit(".", 1)[-1]
            in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
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
    return len(stored)


def _outputs(model: nn.Module, task: str, ids: torch.Tensor) -> torch.Tensor:
    if task == "causal-lm":
        return model(input_ids=ids, use_cache=False).logits.float()
    return model(input_ids=ids).last_hidden_state.float()


def library_versions() -> dict:
    try:
        slimformer = importlib.metadata.version("slimformer")
    except importlib.metadata.PackageNotFoundError:
        slimformer = "unknown"
    return {
        "python": platform.python_version(),
        "safetensors": safetensors.__version__,
        "slimformer": slimformer,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def model_card(
    loaded: LoadedModel, config: dict, *, recipe: dict, metrics: dict, inputs: dict
) -> str:
    quantization = config.get("quantization_config")
    model_class = "AutoModelForCausalLM" if loaded.task == "causal-lm" else "AutoModel"
    float_layers = (
        "Layers left in float32: "
        + (", ".join(f"`{name}`" for name in (quantization or {}).get("ignore", [])) or "none")
        + "."
    )
    slimformer_load = (
        "```python\nfrom workers.compression.export import load_artifact\n\n"
        'loaded = load_artifact("path/to/this/folder")\n'
        'outputs = loaded.model(**loaded.tokenizer("Hello", return_tensors="pt"))\n```'
    )
    if quantization and sparse_storage_format(quantization):
        layout, how = model_card_text(quantization, model_class, slimformer_load)
    elif quantization and quantization["format"] == PACKED_FORMAT:
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
            + float_layers
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
    elif quantization and quantization["format"] == FLOAT_FORMAT:
        dynamic = any(g["input_activations"] for g in quantization["config_groups"].values())
        layout = (
            "compressed-tensors `float-quantized`: FP8 (E4M3) weights with one float32 scale per "
            "output channel; activations "
            + ("are cast to FP8 per token at run time. " if dynamic else "stay in float. ")
            + float_layers
        )
        how = (
            "vLLM runs it with FP8 kernels on GPUs that have them (compute capability 8.9+); "
            "transformers (with the `compressed-tensors` package) loads it as it is. With "
            "Slimformer (FP8 matrix multiplies where the GPU has them, float arithmetic on the FP8 "
            "values elsewhere):\n\n" + slimformer_load
        )
    elif quantization:
        groups = quantization["config_groups"].values()
        strategies = sorted({group["weights"]["strategy"] for group in groups})
        static = any(not group["input_activations"]["dynamic"] for group in groups)
        layout = (
            "compressed-tensors `int-quantized`: int8 weights (symmetric, per "
            f"{' / per '.join(strategies)}) with float32 scales; activations are quantized to int8 "
            + (
                "with one calibrated scale per layer (`input_scale`). "
                if static
                else "per token at run time. "
            )
            + float_layers
        )
        how = (
            "With Slimformer (int8 x int8 kernels; dynamic_int8 layers use torch's CPU dynamic "
            "int8 kernels, which quantize activations per tensor):\n\n"
            + slimformer_load
            + "\n\ntransformers (with the `compressed-tensors` package installed) and vLLM read "
            "the `quantization_config` in config.json directly."
        )
    else:
        layout = "a dense float32 safetensors model."
        how = (
            f"```python\nfrom transformers import {model_class}, AutoTokenizer\n\n"
            f'model = {model_class}.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```'
        )
    lines = [
        f"# {loaded.architecture} compressed with Slimformer",
        "",
        f"A `{loaded.architecture}` ({loaded.task}) model, stored as {layout}",
        "",
        "## Inputs",
        "",
        _json_block(inputs),
        "",
        "## Recipe",
        "",
        _json_block(recipe),
        "",
        "## Metrics",
        "",
        *_metrics_table(metrics),
        "",
        "## How to load",
        "",
        how,
        "",
        "`slimformer.json` holds the recipe, the metrics with their settings, library versions and "
        "the sha256 of every file.",
        "",
    ]
    return "\n".join(lines)


def _metrics_table(metrics: dict) -> list[str]:
    baseline, compressed = metrics.get("baseline"), metrics.get("compressed")
    if not isinstance(baseline, dict) or not isinstance(compressed, dict):
        return [_json_block(metrics)]
    rows = ["| metric | baseline | compressed |", "|---|---|---|"]
    for key in sorted(set(baseline) | set(compressed)):
        rows.append(f"| {key} | {_cell(baseline.get(key))} | {_cell(compressed.get(key))} |")
    rest = {k: v for k, v in metrics.items() if k not in ("baseline", "compressed")}
    if rest:
        rows += ["", "Settings and other details:", "", _json_block(rest)]
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _json_block(value) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n```"


def _write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
