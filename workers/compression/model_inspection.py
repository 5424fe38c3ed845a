"""Decide whether an extracted folder is a Hugging Face model Slimformer accepts, without loading.

Untrusted models are data, never code (DESIGN principle 4): a folder with Python files or an
`auto_map` (custom code transformers would import) is refused, and so is one whose only weights are
pickles, which execute code when unpickled. Weights are judged from the safetensors headers alone
(8-byte length, then JSON naming each tensor's dtype, shape and byte range), so a folder of any size
is inspected in milliseconds and a header that disagrees with the file is caught before a worker
mmaps it. A folder holding one GGUF file is accepted too; the worker converts it to safetensors.

transformers and gguf are imported inside the functions that need them, so the module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
CODE_SUFFIXES = frozenset({".py", ".pyc"})
# Keys through which a config asks transformers to import code shipped with (or named by) the model,
# and the files transformers reads them from.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")
REMOTE_CODE_FILES = (
    "config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
)  # fmt: skip
# The safetensors library refuses headers above 100 MB; a bigger one is corrupt or hostile.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# Bits per element for every safetensors dtype (the sub-byte float formats pack several per byte).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}  # fmt: skip
# llama.cpp spells a few architectures differently from transformers' model_type.
GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}

Task = Literal["causal-lm", "sequence-classification", "feature-extraction"]


class ModelRejected(Exception):
    """A model folder that cannot be accepted; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class ModelInfo:
    architecture: str
    model_type: str
    task: Task
    parameters: int  # elements of the floating-point tensors
    size_bytes: int  # of the weight files
    weight_format: Literal["safetensors", "gguf"]
    weight_files: list[str]  # relative to the folder
    # Every 2-D `<name>.weight` tensor as name -> [out_features, in_features] (embeddings included);
    # empty for GGUF, whose tensor names are llama.cpp's until the worker converts them.
    linear_shapes: dict[str, list[int]]
    config: dict[str, Any]  # config.json, or for GGUF the scalar metadata
    # Every stored tensor's shape, from the safetensors headers (empty for GGUF).
    tensor_shapes: dict[str, list[int]] = field(default_factory=dict)


def is_pickled_weight(name: str) -> bool:
    """True for files that hold pickled tensors (loading one runs arbitrary code)."""
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# `progress(step, total_steps, detail)`: one step per weight file whose header has been read.
HeaderProgress = Callable[[int, int, str], None]


def inspect_model_folder(folder: Path, progress: HeaderProgress | None = None) -> ModelInfo:
    """Accept `folder` as a model or raise ModelRejected (`unsafe_model` / `unsupported_model`)."""
    folder = Path(folder)
    files = _list_files(folder)
    code = sorted(name for name in files if Path(name).suffix.lower() in CODE_SUFFIXES)
    if code:
        raise ModelRejected(
            "unsafe_model",
            f"model folder contains Python code ({', '.join(code[:5])}); "
            "custom modelling code is never run, remove it and use a built-in architecture",
        )
    for name in REMOTE_CODE_FILES:
        if name in files:
            _refuse_remote_code(name, _read_json(folder / name))

    safetensors = sorted(
        name for name in files if "/" not in name and name.endswith(".safetensors")
    )
    ggufs = sorted(name for name in files if "/" not in name and name.endswith(".gguf"))
    if safetensors:
        return _inspect_safetensors(folder, safetensors, progress)
    if len(ggufs) == 1:
        return _inspect_gguf(folder, ggufs[0])
    if ggufs:
        raise ModelRejected(
            "unsupported_model", f"model folder holds {len(ggufs)} GGUF files; upload exactly one"
        )
    pickles = sorted(name for name in files if is_pickled_weight(name))
    if pickles:
        raise ModelRejected(
            "unsafe_model",
            f"the only weights are pickled ({', '.join(pickles[:5])}), and loading a "
            "pickle runs arbitrary code; convert the model to safetensors (for example "
            "`model.save_pretrained(folder, safe_serialization=True)`) and upload it again",
        )
    raise ModelRejected(
        "unsupported_model", "model folder has no weights: expected *.safetensors (or one *.gguf)"
    )


def _list_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise ModelRejected("unsupported_model", "model folder does not exist")
    files = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise ModelRejected("unsafe_model", f"model folder contains a link ({name})")
        if path.is_file():
            files.append(name)
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelRejected(
            "unsupported_model", f"{path.name} is not valid JSON: {error}"
        ) from None
    if not isinstance(content, dict):
        raise ModelRejected("unsupported_model", f"{path.name} is not a JSON object")
    return content


def _refuse_remote_code(name: str, content: Any) -> None:
    """Look for remote-code keys at any depth (composite configs nest a text_config, say)."""
    if isinstance(content, dict):
        for key, value in content.items():
            if key in REMOTE_CODE_KEYS:
                raise ModelRejected(
                    "unsafe_model",
                    f"{name} sets `{key}`, which makes transformers import code "
                    "shipped with the model; remove it and use a built-in architecture",
                )
            _refuse_remote_code(name, value)
    elif isinstance(content, list):
        for value in content:
            _refuse_remote_code(name, value)


# --- safetensors -------------------------------------------------------------------------------


def _inspect_safetensors(
    folder: Path, weight_files: list[str], progress: HeaderProgress | None = None
) -> ModelInfo:
    if not (folder / "config.json").is_file():
        raise ModelRejected("unsupported_model", "model folder has no config.json")
    config = _read_json(folder / "config.json")
    model_type, architecture, task = _resolve_architecture(config)
    _check_shard_index(folder, weight_files)

    parameters = 0
    linear_shapes: dict[str, list[int]] = {}
    tensor_shapes: dict[str, list[int]] = {}
    seen: dict[str, str] = {}
    for index, name in enumerate(weight_files):
        if progress is not None:
            progress(index, len(weight_files), f"shard {index + 1}/{len(weight_files)} · {name}")
        for tensor, (dtype, shape) in _read_safetensors_header(folder / name).items():
            if tensor in seen:
                raise ModelRejected(
                    "unsupported_model", f"tensor {tensor!r} is in both {seen[tensor]} and {name}"
                )
            seen[tensor] = name
            # Integer tensors are buffers (BERT's position_ids), not parameters.
            if dtype.startswith(("F", "BF")):
                parameters += math.prod(shape)
            tensor_shapes[tensor] = list(shape)
            if len(shape) == 2 and tensor.endswith(".weight"):
                linear_shapes[tensor.removesuffix(".weight")] = list(shape)
    if progress is not None:
        progress(len(weight_files), len(weight_files), f"{len(weight_files)} shards read")
    return ModelInfo(
        architecture=architecture,
        model_type=model_type,
        task=task,
        parameters=parameters,
        size_bytes=sum((folder / name).stat().st_size for name in weight_files),
        weight_format="safetensors",
        weight_files=weight_files,
        linear_shapes=linear_shapes,
        config=config,
        tensor_shapes=tensor_shapes,
    )


def _resolve_architecture(config: dict[str, Any]) -> tuple[str, str, Task]:
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ModelRejected(
            "unsupported_model",
            f"config.json model_type {model_type!r} is not an architecture transformers knows",
        )
    architectures = config.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise ModelRejected("unsupported_model", "config.json lists no architectures")
    known = set()
    for attribute in dir(modeling_auto):
        if attribute.endswith("_MAPPING_NAMES") and attribute != "CONFIG_MAPPING_NAMES":
            for names in getattr(modeling_auto, attribute).values():
                known.update([names] if isinstance(names, str) else names)
    unknown = [name for name in architectures if not isinstance(name, str) or name not in known]
    if unknown:
        raise ModelRejected(
            "unsupported_model", f"architecture {unknown[0]!r} is not one transformers provides"
        )
    architecture = architectures[0]
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return model_type, architecture, "causal-lm"
    if architecture.endswith("ForSequenceClassification"):
        return model_type, architecture, "sequence-classification"
    if architecture == modeling_auto.MODEL_MAPPING_NAMES.get(model_type):
        return model_type, architecture, "feature-extraction"
    raise ModelRejected(
        "unsupported_model",
        f"architecture {architecture} is not supported: Slimformer compresses causal language "
        "models (*ForCausalLM), sequence classifiers (*ForSequenceClassification) and bare "
        "encoders (e.g. BertModel)",
    )


def _check_shard_index(folder: Path, weight_files: list[str]) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelRejected("unsupported_model", f"{index.name} has no weight_map")
    missing = sorted(set(weight_map.values()) - set(weight_files))
    if missing:
        raise ModelRejected(
            "unsupported_model", f"{index.name} names shards that are missing: {missing[:5]}"
        )


def _read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape), once the header is checked to describe exactly the file."""

    def corrupt(reason: str) -> ModelRejected:
        return ModelRejected("unsupported_model", f"{path.name} is not valid safetensors: {reason}")

    file_size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise corrupt("file is shorter than its 8-byte header length")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(MAX_SAFETENSORS_HEADER_BYTES, file_size - 8):
            raise corrupt(f"header length {header_size} exceeds the file")
        raw = stream.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise corrupt(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)

    tensors: dict[str, tuple[str, list[int]]] = {}
    ranges = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            bits = SAFETENSORS_DTYPE_BITS[dtype]
            if not all(isinstance(value, int) and value >= 0 for value in [*shape, begin, end]):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed entry") from None
        if end - begin != math.ceil(math.prod(shape) * bits / 8):
            raise corrupt(f"tensor {name!r} of shape {shape} ({dtype}) spans {end - begin} bytes")
        tensors[name] = (dtype, shape)
        ranges.append((begin, end, name))
    # The tensors must tile the data section exactly: no gaps, no overlaps, nothing missing.
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise corrupt(f"tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != file_size - 8 - header_size:
        raise corrupt(
            f"tensors cover {position} bytes but the file holds {file_size - 8 - header_size}"
        )
    return tensors


# --- GGUF --------------------------------------------------------------------------------------


def _inspect_gguf(folder: Path, name: str) -> ModelInfo:
    from gguf import GGUFReader, GGUFValueType
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        reader = GGUFReader(folder / name)
        field = reader.fields.get("general.architecture")
        gguf_architecture = field.contents() if field else None
        if not isinstance(gguf_architecture, str):
            raise ValueError("general.architecture is missing")
        parameters = sum(math.prod(int(dim) for dim in tensor.shape) for tensor in reader.tensors)
        metadata = {
            key: field.contents()
            for key, field in reader.fields.items()
            if len(field.types) == 1 and field.types[0] != GGUFValueType.ARRAY
        }
    except (ValueError, KeyError, IndexError, OSError, struct.error) as error:
        raise ModelRejected(
            "unsupported_model", f"{name} is not a valid GGUF file: {error}"
        ) from None
    model_type = GGUF_MODEL_TYPES.get(gguf_architecture, gguf_architecture)
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if model_type not in GGUF_CONFIG_MAPPING or architecture is None:
        raise ModelRejected(
            "unsupported_model",
            f"GGUF architecture {gguf_architecture!r} cannot be converted by transformers",
        )
    return ModelInfo(
        architecture=architecture,
        model_type=model_type,
        task="causal-lm",
        parameters=parameters,
        size_bytes=(folder / name).stat().st_size,
        weight_format="gguf",
        weight_files=[name],
        linear_shapes={},
        config=metadata,
    )
