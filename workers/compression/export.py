"""Writing compressed models as folders people can load, and proving that they load.

A dense model is a standard Hugging Face folder. A dynamic-int8 model uses the compressed-tensors
`int-quantized` layout, the format transformers (with the compressed-tensors package) and vLLM
read: for each quantized Linear `<name>.weight` holds the int8 values and `<name>.weight_scale` the
float32 scales ([out, 1] per channel, [1] per tensor); zero points are omitted because the
quantization is symmetric; and config.json carries a `quantization_config` describing the scheme.
`load_artifact` reads that same folder back into a runnable CPU model without compressed-tensors.

Bytes are deterministic: tensors, config and metadata depend only on the model and the arguments
(no timestamps, JSON keys sorted), and the folder appears by one rename once every file is written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
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

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "slimformer.json"


class ExportVerificationError(RuntimeError):
    """The written artifact does not reproduce the model it was written from."""


def save_model(
    loaded: LoadedModel,
    model: nn.Module,
    folder: Path,
    *,
    recipe: dict,
    metrics: dict,
    inputs: dict,
    versions: dict | None = None,
) -> list[Path]:
    """Write `model` (the compressed form of `loaded`) to `folder`, which must not exist yet or be
    empty. Returns the files written, sorted."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors, int8_layers = _weight_tensors(model)
    config = json.loads(model.config.to_json_string())  # what save_pretrained writes
    config.pop("quantization_config", None)
    config["architectures"] = [loaded.architecture]  # as save_pretrained records it
    if int8_layers:
        float_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        config["quantization_config"] = compressed_tensors_config(int8_layers, float_linears)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(output, nnqd.Linear):
            # The int8 head can no longer share the float embedding's tensor.
            config["tie_word_embeddings"] = False

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
                "format": "int-quantized" if int8_layers else "dense",
                "architecture": loaded.architecture,
                "task": loaded.task,
                "recipe": recipe,
                "metrics": metrics,
                "inputs": inputs,
                "versions": versions,
                "files": files,
            },
        )
        publish_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _weight_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """(tensors to write, {int8 layer name: per_channel}). Tied weights are written once, under
    the name transformers expects (the embedding), as `save_pretrained` does."""
    int8_modules = {n: m for n, m in model.named_modules() if isinstance(m, nnqd.Linear)}
    tensors = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if any(owner == name or owner.startswith(name + ".") for name in int8_modules):
            continue  # packed int8 params; written below in the compressed-tensors layout
        tensors[key] = value
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        tied = target in tensors and source in tensors
        if tied and tensors[target].data_ptr() == tensors[source].data_ptr():
            del tensors[target]
    int8_layers = {}
    for name, module in int8_modules.items():
        q, scale = int8_weight_and_scale(module)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = scale
        bias = module.bias()
        if bias is not None:
            tensors[f"{name}.bias"] = bias
        int8_layers[name] = scale.dim() == 2  # [out, 1] per channel, [1] per tensor
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, int8_layers


def compressed_tensors_config(int8_layers: dict[str, bool], float_linears: list[str]) -> dict:
    """The `quantization_config` for int8 weights (symmetric, per channel or per tensor) with int8
    activations quantized dynamically per token, in compressed-tensors' schema."""

    def scheme(strategy: str) -> dict:
        return {
            "input_activations": {
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
            },
            "output_activations": None,
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": None,
                "num_bits": 8,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": strategy,
                "symmetric": True,
                "type": "int",
            },
        }

    strategies = {
        "channel": sorted(name for name, per_channel in int8_layers.items() if per_channel),
        "tensor": sorted(name for name, per_channel in int8_layers.items() if not per_channel),
    }
    used = {strategy: names for strategy, names in strategies.items() if names}
    groups = {}
    for index, (strategy, names) in enumerate(used.items()):
        # One scheme covers every Linear not ignored; mixed schemes name their layers exactly.
        targets = ["Linear"] if len(used) == 1 else names
        groups[f"group_{index}"] = {**scheme(strategy), "targets": targets}
    return {
        "config_groups": groups,
        "format": "int-quantized",
        "global_compression_ratio": None,
        "ignore": sorted(float_linears),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def load_artifact(folder: Path, *, device: torch.device | str | None = None) -> LoadedModel:
    """Load any folder `save_model` writes: dense ones as transformers does, int8 ones by building
    the architecture from config.json and putting torch's dynamic int8 Linear in place of every
    quantized layer. Safetensors only; int8 models run on CPU."""
    folder = Path(folder)
    config_data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quantization = config_data.get("quantization_config")
    if quantization is None:
        return load_model(folder, device=device)
    _check_int8_scheme(quantization)
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError("dynamic int8 models run on CPU only")

    architecture = read_architecture(folder)
    task = task_of(architecture)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    del config.quantization_config  # build the plain float architecture; int8 goes in below
    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    model = model_class.from_config(config, dtype=torch.float32)

    state = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    names = sorted(
        key.removesuffix(".weight_scale") for key in state if key.endswith(".weight_scale")
    )
    int8 = {
        name: (state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")) for name in names
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "all_tied_weights_keys", {})
    absent = [
        key
        for key in missing
        if key.removesuffix(".weight") not in int8 and not (key in tied and tied[key] in state)
    ]
    if unexpected or absent:
        raise UnsupportedModelError(
            f"weights do not match {architecture}: "
            f"unexpected {unexpected[:5]}, missing {absent[:5]}"
        )
    for name, (q, scale) in int8.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(q.shape):
            raise UnsupportedModelError(f"{name} is not a Linear of shape {tuple(q.shape)}")
        model.set_submodule(name, int8_linear(q, scale, linear.bias))
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(folder, task),
        task=task,
        architecture=architecture,
        folder=folder,
    )


def _check_int8_scheme(quantization: dict) -> None:
    if (
        quantization.get("quant_method") != "compressed-tensors"
        or quantization.get("format") != "int-quantized"
    ):
        raise UnsupportedModelError(
            f"unsupported quantization_config: {quantization.get('quant_method')} "
            f"{quantization.get('format')}"
        )
    for group in quantization.get("config_groups", {}).values():
        weights = group.get("weights") or {}
        if (weights.get("num_bits"), weights.get("type"), weights.get("symmetric")) != (
            8,
            "int",
            True,
        ) or weights.get("strategy") not in ("channel", "tensor"):
            raise UnsupportedModelError(f"unsupported int8 weight scheme: {weights}")


def verify_export(
    folder: Path, model_in_memory: nn.Module, loaded_task: str, sample_input_ids: torch.Tensor
) -> dict:
    """Load the artifact the documented way and check it computes what the model in memory does.
    Raises ExportVerificationError if not; returns the comparison otherwise."""
    device = next(model_in_memory.parameters()).device
    artifact = load_artifact(folder, device=device)
    ids = sample_input_ids.to(device)
    with torch.inference_mode():
        expected = _outputs(model_in_memory, loaded_task, ids)
        actual = _outputs(artifact.model, loaded_task, ids)
    max_abs_diff = (expected - actual).abs().max().item()
    cosine = F.cosine_similarity(
        expected.double().flatten(), actual.double().flatten(), dim=0
    ).item()
    # Same weights and kernels give the same numbers; allow float noise from op ordering only.
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    report = {
        "max_abs_diff": max_abs_diff,
        "cosine": cosine,
        "tolerance": tolerance,
        "loaded_as": type(artifact.model).__name__,
    }
    if not max_abs_diff <= tolerance:  # also catches NaN
        raise ExportVerificationError(f"exported model disagrees with the original: {report}")
    return report


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
    if quantization:
        strategies = sorted(
            {group["weights"]["strategy"] for group in quantization["config_groups"].values()}
        )
        layout = (
            "compressed-tensors `int-quantized`: int8 weights (symmetric, per "
            f"{' / per '.join(strategies)}) with float32 scales; activations are quantized to int8 "
            "at run time. Layers left in float32: "
            + (", ".join(f"`{name}`" for name in quantization["ignore"]) or "none")
            + "."
        )
        how = (
            "With Slimformer (CPU, torch's dynamic int8 kernels; activations are quantized per "
            "tensor there, per token in vLLM):\n\n"
            "```python\nfrom workers.compression.export import load_artifact\n\n"
            'loaded = load_artifact("path/to/this/folder")\n'
            'outputs = loaded.model(**loaded.tokenizer("Hello", return_tensors="pt"))\n```\n\n'
            "transformers (with the `compressed-tensors` package installed) and vLLM read the "
            "`quantization_config` in config.json directly."
        )
    else:
        layout = "a dense float32 safetensors model."
        model_class = "AutoModelForCausalLM" if loaded.task == "causal-lm" else "AutoModel"
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
