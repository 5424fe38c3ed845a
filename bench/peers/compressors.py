"""How each library compresses a model and saves the result, for `bench.peers.worker`.

A compressor has three steps, which the worker times and measures separately:
- `check()` raises `Unavailable` before anything is loaded when the method cannot run here (a
  Slimformer method not registered yet, a library not installed): the row is skipped, not failed;
- `compress(loaded, calibration, targets)` is the timed part; it changes `loaded.model` in place;
- `export(loaded, folder)` saves what the library saves and returns the model to measure: the saved
  result loaded back the library's documented way where there is one, else the in-memory model.

`targets` are the Linear layers Slimformer's stages touch by default (those inside the blocks: not
SmolLM2's lm_head, not BERT's pooler); every peer is pointed at exactly those layers.
Peer libraries are imported inside the methods, so this module imports in both venvs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

NOT_REGISTERED = "no method is registered"


class Unavailable(Exception):
    """The method cannot run here: the row is recorded as skipped, with this reason."""


@dataclass
class Exported:
    model: nn.Module  # what the quality and latency numbers are of
    format: str  # what the files on disk are
    measured: str  # which model `model` is, in words
    files: list[Path]  # the weight files whose size is the size on disk
    details: dict = field(default_factory=dict)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def targets_of(model: nn.Module) -> list[str]:
    """The Linear layers Slimformer's stages touch by default: those inside the model's blocks."""
    from workers.compression.layer_selection import linear_layers
    from workers.compression.recipe import StageConfig

    return linear_layers(model, StageConfig(method="bench"))[0]


def _other_linears(model: nn.Module, targets: list[str]) -> list[str]:
    wanted = set(targets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in wanted
    ]


def weight_zero_fraction(model: nn.Module, targets: list[str]) -> float | None:
    """The fraction of exact zeros in the target layers' float weights (None: no float weights)."""
    zeros = total = 0
    for name in targets:
        weight = getattr(model.get_submodule(name), "weight", None)
        # Plain float weights only: int8 modules and torchao's tensor subclasses have none.
        plain = isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor
        if plain and weight.is_floating_point():
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else None


class Float32:
    """The baseline: nothing compressed, measured as loaded; its size is the float32 folder."""

    def check(self) -> None:
        pass

    def compress(self, loaded, calibration, targets) -> dict:
        return {}

    def export(self, loaded, folder: Path) -> Exported:
        return Exported(
            loaded.model,
            "the float32 safetensors folder the model was loaded from",
            "the float32 model",
            _weight_files(loaded.folder),
        )


class Slimformer:
    """`workers.compression.compress` with a recipe, then the service's export and reload."""

    def __init__(self, stages: list[dict]) -> None:
        from workers.compression.recipe import Recipe

        self.recipe = Recipe.model_validate({"stages": stages})

    def check(self) -> None:
        from workers.compression import engine  # noqa: F401  (registers the methods)
        from workers.compression.registry import method_for

        for stage in self.recipe.stages:
            try:
                method_for(stage)
            except ValueError as error:
                raise Unavailable(str(error)) from None

    def compress(self, loaded, calibration, targets) -> dict:
        from workers.compression import compress

        try:
            result = compress(loaded.model, self.recipe, calibration)
        except ValueError as error:
            if NOT_REGISTERED in str(error):
                raise Unavailable(str(error)) from None
            raise
        return {"stages": result.stages}

    def export(self, loaded, folder: Path) -> Exported:
        from workers.compression.export import load_artifact, save_model

        recipe = self.recipe.model_dump(mode="json")
        try:
            save_model(loaded, loaded.model, folder, recipe=recipe, metrics={}, inputs={})
        except Exception as error:  # noqa: BLE001  (a method whose format export cannot write yet)
            return Exported(
                loaded.model,
                f"not saved: {type(error).__name__}: {error}",
                "the in-memory model (the export failed)",
                [],
            )
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        quantization = config.get("quantization_config") or {}
        storage = quantization.get("format") or (quantization.get("sparsity_config") or {}).get(
            "format", "dense"
        )
        artifact = load_artifact(folder, device="cpu")
        return Exported(
            artifact.model,
            f"Slimformer folder: safetensors, compressed-tensors `{storage}`",
            "the saved folder loaded with export.load_artifact, as the service measures it",
            _weight_files(folder),
            {"runtime": getattr(artifact.model, "slimformer_runtime", None)},
        )


class LlmCompressor:
    """llm-compressor's `oneshot` with a list of modifiers on the same pre-tokenized calibration
    windows, saved with `save_pretrained(save_compressed=True)` and loaded back with transformers."""

    def __init__(self, kind: str, **options) -> None:
        self.kind = kind
        self.options = options

    def check(self) -> None:
        try:
            import llmcompressor  # noqa: F401
        except ImportError as error:
            raise Unavailable(f"llmcompressor is not installed in this venv: {error}") from None

    def modifiers(self, targets: list[str], ignore: list[str]) -> list:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.pruning import (
            MagnitudePruningModifier,
            SparseGPTModifier,
            WandaPruningModifier,
        )
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        options = dict(self.options)
        # Slimformer's w4 g64: symmetric int4, one scale per 64 input channels, no zero point.
        w4_g64 = {
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(
                    num_bits=4, type="int", symmetric=True, strategy="group", group_size=64
                ),
            )
        }
        linear = {"targets": ["Linear"], "ignore": ignore}
        if self.kind == "gptq-w4a16":
            return [GPTQModifier(config_groups=w4_g64, **linear, **options)]
        if self.kind == "awq-w4a16":
            return [AWQModifier(**options), QuantizationModifier(config_groups=w4_g64, **linear)]
        if self.kind == "smoothquant-gptq-w8a8":
            return [
                SmoothQuantModifier(smoothing_strength=options.pop("smoothing_strength")),
                GPTQModifier(scheme="W8A8", **linear, **options),
            ]
        if self.kind == "smoothquant-rtn-w8a8":
            return [
                SmoothQuantModifier(smoothing_strength=options.pop("smoothing_strength")),
                QuantizationModifier(scheme="W8A8", **linear, **options),
            ]
        if self.kind == "sparsegpt":
            return [SparseGPTModifier(**linear, **options)]
        if self.kind == "wanda":
            return [WandaPruningModifier(**linear, **options)]
        if self.kind == "magnitude":
            # Its targets are module names (it was written for gradual pruning during training).
            return [MagnitudePruningModifier(targets=targets, **options)]
        raise ValueError(f"unknown llm-compressor recipe {self.kind!r}")

    def compress(self, loaded, calibration, targets) -> dict:
        from datasets import Dataset
        from llmcompressor import oneshot

        ids = torch.cat(calibration)
        # Token ids, not text: llm-compressor sees exactly the windows Slimformer does.
        dataset = Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
        )
        modifiers = self.modifiers(targets, _other_linears(loaded.model, targets))
        norms = {
            name: module.weight.detach().clone()
            for name, module in loaded.model.named_modules()
            if "norm" in type(module).__name__.lower()
            and getattr(module, "weight", None) is not None
        }
        oneshot(
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            dataset=dataset,
            recipe=modifiers,
            num_calibration_samples=len(calibration),
            max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False,
        )
        rescaled = [
            name
            for name, weight in norms.items()
            if not torch.equal(loaded.model.get_submodule(name).weight.detach(), weight)
        ]
        if self.kind == "magnitude" and weight_zero_fraction(loaded.model, targets) < 0.01:
            raise RuntimeError(
                "MagnitudePruningModifier pruned nothing under oneshot: it applies its masks at "
                "optimizer steps, so it prunes only while training"
            )
        # SmoothQuant and AWQ rescale the norm before the layers they balance; 0 here means their
        # mappings matched nothing in this architecture (they fall back to Llama names).
        summary = {"modifiers": [repr(modifier) for modifier in modifiers]}
        if self.kind.startswith(("smoothquant", "awq")):
            summary["norm_layers_rescaled"] = len(rescaled)
        return summary

    def export(self, loaded, folder: Path) -> Exported:
        from transformers import AutoModel, AutoModelForCausalLM

        loaded.model.save_pretrained(folder, save_compressed=True)
        loaded.tokenizer.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        quantization = config.get("quantization_config") or {}
        formats = [
            quantization.get("format"),
            (quantization.get("sparsity_config") or {}).get("format"),
        ]
        described = " + ".join(str(f) for f in formats if f) or "dense"
        model_class = AutoModelForCausalLM if loaded.task == "causal-lm" else AutoModel
        # transformers' default compressed-tensors route: weights stay compressed until the first
        # forward decompresses them; activations are fake-quantized where the scheme has them.
        reloaded = model_class.from_pretrained(folder, dtype=torch.float32).eval()
        layer = reloaded.get_submodule(targets_of(reloaded)[0])
        return Exported(
            reloaded,
            f"safetensors, compressed-tensors `{described}`",
            "the saved folder loaded back with transformers' from_pretrained",
            _weight_files(folder),
            {
                "quantization_config": quantization,
                "loaded_layer": f"{type(layer).__name__} holding "
                + ", ".join(name for name, _ in layer.named_parameters()),
            },
        )


class TorchAo:
    """torchao's `quantize_` with one of its configs, on the target Linear layers."""

    def __init__(self, config: str, **options) -> None:
        self.config = config
        self.options = options

    def check(self) -> None:
        try:
            import torchao  # noqa: F401
        except ImportError as error:
            raise Unavailable(f"torchao is not installed in this venv: {error}") from None

    def build_config(self):
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
        )

        if self.config == "int8-weight-only":
            return Int8WeightOnlyConfig(**self.options)
        if self.config == "int8-dynamic-activation-int8-weight":
            return Int8DynamicActivationInt8WeightConfig(**self.options)
        if self.config == "int4-weight-only":
            return Int4WeightOnlyConfig(**self.options)
        if self.config == "intx-weight-only":
            group_size = self.options.pop("group_size")
            return IntxWeightOnlyConfig(
                weight_dtype=getattr(torch, self.options.pop("weight_dtype")),
                granularity=PerGroup(group_size),
                **self.options,
            )
        raise ValueError(f"unknown torchao config {self.config!r}")

    def compress(self, loaded, calibration, targets) -> dict:
        from torchao.quantization import quantize_

        config = self.build_config()
        wanted = set(targets)
        quantize_(loaded.model, config, filter_fn=lambda module, name: name in wanted)
        quantized = {
            type(module.weight).__name__
            for name, module in loaded.model.named_modules()
            if name in wanted
        }
        return {"config": repr(config), "weight_types": sorted(quantized)}

    def export(self, loaded, folder: Path) -> Exported:
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        state, seen = {}, set()
        for key, tensor in loaded.model.state_dict().items():
            if type(tensor) is torch.Tensor:  # tied plain tensors (SmolLM2's embedding) once
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
            state[key] = tensor
        tensors, metadata = flatten_tensor_state_dict(state)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "model.safetensors", metadata=metadata)
        return Exported(
            loaded.model,
            "safetensors with torchao's tensor-subclass metadata (torchao.prototype.safetensors)",
            "the in-memory model: torchao quantizes in place, and that is what it saves",
            _weight_files(folder),
        )


class TorchDynamicInt8:
    """`torch.ao.quantization.quantize_dynamic`, per-channel int8 weights, on the target layers."""

    def check(self) -> None:
        pass

    def compress(self, loaded, calibration, targets) -> dict:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(
            loaded.model,
            {name: per_channel_dynamic_qconfig for name in targets},
            dtype=torch.qint8,
            inplace=True,
        )
        return {"qconfig": "per_channel_dynamic_qconfig (activations: reduce_range on x86)"}

    def export(self, loaded, folder: Path) -> Exported:
        folder.mkdir(parents=True, exist_ok=True)
        # torch.ao's packed int8 params have no safetensors form. The bench writes this pickle
        # only to measure its size and never loads it.
        torch.save(loaded.model.state_dict(), folder / "state_dict.pt")
        return Exported(
            loaded.model,
            "torch.save of the state_dict (pickle; torch.ao has no safetensors form)",
            "the in-memory model",
            [folder / "state_dict.pt"],
        )


LIBRARIES = {
    "fp32": Float32,
    "slimformer": Slimformer,
    "llm-compressor": LlmCompressor,
    "torchao": TorchAo,
    "torch.ao": TorchDynamicInt8,
}


def build(library: str, options: dict):
    return LIBRARIES[library](**options)
