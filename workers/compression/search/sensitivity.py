"""How much each unit alone hurts, per option: measured once, cached, and the solver's input.

The proxy is cheap and close to the targets: for a causal LM, the KL divergence of the next-token
distribution from the original's, averaged over the search split's tokens; for an encoder,
1 - cosine of the mean-pooled sentence embeddings. Each (unit, option) pair is measured with only
that unit compressed (by `compress` itself, so the proxy sees exactly what a recipe would do), the
rest of the model untouched, and the unit restored afterwards.

The result depends only on the model, the options and the data, so it is cached under the sha256 of
those three: a second search on the same model reads it back instead of measuring again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from workers.compression.calibration import (
    block_layers,
    capture_block_inputs,
    input_hessians,
    model_blocks,
)
from workers.compression.engine import compress
from workers.compression.evaluation import linear_layer_names
from workers.compression.methods.gptq import HessianFactor, inverse_hessian_factor, quantize_with
from workers.compression.quant import ATTRIBUTE, attach
from workers.compression.recipe import GptqConfig, Recipe, W8A8Config
from workers.compression.search.space import SearchableStage, Unit, block_of

EMBEDDING_BATCH = 16


class SensitivityCache(Protocol):
    def get(self, key: str) -> dict | None: ...
    def put(self, key: str, value: dict) -> None: ...


class DirectoryCache:
    """The plain-Python cache: one JSON file per key in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def put(self, key: str, value: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{key}.partial"
        partial.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
        partial.replace(self.folder / f"{key}.json")


class Proxy:
    """The reference outputs of the original model on the search split, and the distance of any
    model's outputs from them (0: identical)."""

    def __init__(self, model: nn.Module, *, task: str, inputs: list[torch.Tensor], device) -> None:
        self.task = task
        self.inputs = [ids.to(device) for ids in inputs]
        # Every block's output on the reference pass: a unit inside block k changes nothing before
        # it, so its measurement replays blocks 0..k-1 from here instead of running them (about
        # half the work of a pass, on average over the blocks).
        self.blocks = block_names(model)
        self.block_outputs: dict[str, list] = {name: [] for name in self.blocks}
        hooks = [
            model.get_submodule(name).register_forward_hook(self._keeper(name))
            for name in self.blocks
        ]
        try:
            self.reference = self._outputs(model)
        finally:
            for hook in hooks:
                hook.remove()

    def _keeper(self, name: str):
        def keep(module, args, output) -> None:
            self.block_outputs[name].append(output)

        return keep

    @torch.inference_mode()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        outputs = []
        for ids in self.inputs:
            if self.task == "causal-lm":
                logits = model(input_ids=ids, use_cache=False).logits.float()
                outputs.append(F.log_softmax(logits, dim=-1))
            else:
                mask = torch.ones_like(ids)
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                outputs.append(F.normalize(pooled, dim=-1))
        return outputs

    def distance(self, model: nn.Module, *, start: str | None = None) -> float:
        """The distance of `model`'s outputs from the reference; `start`: the first block that
        differs from the original (the ones before it are replayed from the reference pass)."""
        replayed = self.blocks[: self.blocks.index(start)] if start in self.blocks else []
        for name in replayed:
            model.get_submodule(name).forward = _Replay(self.block_outputs[name])
        try:
            outputs = self._outputs(model)
        finally:
            for name in replayed:
                del model.get_submodule(name).forward
        total, count = 0.0, 0
        for reference, output in zip(self.reference, outputs, strict=True):
            if self.task == "causal-lm":
                # KL(original || compressed) per token.
                kl = (reference.exp() * (reference - output)).sum(-1)
                total += kl.sum().item()
                count += kl.numel()
            else:
                total += (1 - (reference * output).sum(-1)).sum().item()
                count += output.shape[0]
        return total / max(count, 1)


class _Replay:
    """Stands in for a block's forward: returns its reference outputs, one per proxy input, in
    the order the proxy feeds them."""

    def __init__(self, outputs: list) -> None:
        self.outputs, self.calls = outputs, 0

    def __call__(self, *args, **kwargs):
        output = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return output


def block_names(model: nn.Module) -> list[str]:
    """The model's blocks (the modules named up to a number: "model.layers.3"), in model order."""
    modules = dict(model.named_modules())
    names = dict.fromkeys(block_of(name) for name in linear_layer_names(model))
    return [name for name in names if name in modules and name.split(".")[-1].isdigit()]


def cache_key(
    *,
    model_sha: str,
    options: list[SearchableStage | None],
    units: list[Unit],
    data_sha: str,
    calibration_sha: str | None = None,
) -> str:
    """`calibration_sha`: of the calibration samples, when an option reads them (GPTQ, AWQ)."""
    described = json.dumps(
        {
            "model": model_sha,
            "options": [None if o is None else o.model_dump(mode="json") for o in options],
            "units": [[unit.name, list(unit.layers)] for unit in units],
            "data": data_sha,
            "proxy": 1,
            **({"calibration": calibration_sha} if calibration_sha is not None else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(described.encode()).hexdigest()


def data_sha(inputs: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for ids in inputs:
        digest.update(ids.cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def measure(
    model: nn.Module,
    units: list[Unit],
    options: list[SearchableStage | None],
    proxy: Proxy,
    *,
    calibration: list[torch.Tensor] | None,
    on_step: Callable[[int, int, str], None] | None = None,
) -> dict:
    """{"losses": [[proxy distance per option] per unit], "seconds": ...}; float (None) is 0.

    GPTQ options are measured in one pass over the blocks (`_GptqPass`): a unit alone under GPTQ
    sees its block's original inputs, so each block's Hessians (and their factors, which do not
    depend on the bits) are computed once, from the calibration hidden states advanced through the
    original blocks, and serve every GPTQ option of every unit in the block. That is exactly what
    `compress` of the unit alone computes, without its pass over the whole model per (unit,
    option). Other options go through `compress` itself."""
    started = time.perf_counter()
    losses: list[list[float]] = []
    steps = len(units) * sum(option is not None for option in options)
    step = 0
    gptq_pass = (
        _GptqPass(model, calibration, units)
        if calibration and any(isinstance(option, GptqConfig) for option in options)
        else None
    )
    for unit in units:
        block = block_of(unit.layers[0])
        row = []
        for option in options:
            if option is None:
                row.append(0.0)
                continue
            modules = {name: model.get_submodule(name) for name in unit.layers}
            saved = {name: module.weight.detach().clone() for name, module in modules.items()}
            state = (
                {k: v.detach().clone() for k, v in model.state_dict().items()}
                if option.rescales_weights
                else None
            )
            if isinstance(option, GptqConfig) and gptq_pass is not None and gptq_pass.covers(unit):
                gptq_pass.quantize(unit, option)
            else:
                alone = Recipe(
                    stages=[option.model_copy(update={"modules": list(unit.layers), "ignore": []})]
                )
                compress(model, alone, calibration)
            row.append(proxy.distance(model, start=block))
            for name, module in modules.items():  # W8A8 replaces the layers
                if model.get_submodule(name) is not module:
                    model.set_submodule(name, module)
            _restore(model, saved, state)
            step += 1
            if on_step is not None:
                on_step(step, steps, f"sensitivity of {unit.name} at {_label(option)}")
        losses.append(row)
    result = {"losses": losses, "seconds": round(time.perf_counter() - started, 3)}
    if gptq_pass is not None:
        result["gptq_hessian_seconds"] = round(gptq_pass.seconds, 3)
    return result


class _GptqPass:
    """The calibration hidden states walked through the original blocks in order, with the
    current block's input Hessians and their factors: units must be asked for in model order
    (as `units` lists them), and the model must be back to its original weights between calls."""

    def __init__(
        self, model: nn.Module, calibration: list[torch.Tensor], units: list[Unit]
    ) -> None:
        self.model = model
        self.blocks_name, self.blocks = model_blocks(model)
        # Every covered unit's layers, per block: one run of the block collects all their inputs.
        self.layers_of: dict[str, list[str]] = {}
        for unit in units:
            if self.covers(unit):
                self.layers_of.setdefault(block_of(unit.layers[0]), []).extend(unit.layers)
        with torch.no_grad():
            self.inputs = capture_block_inputs(model, calibration)
        self.index = -1  # the block whose Hessians are held
        self.hessians: dict[str, torch.Tensor] = {}
        self.factors: dict[tuple, HessianFactor] = {}
        self.seconds = 0.0

    def covers(self, unit: Unit) -> bool:
        block = block_of(unit.layers[0])
        prefix = f"{self.blocks_name}."
        if not block.startswith(prefix) or not block[len(prefix) :].isdigit():
            return False
        return all(block_of(name) == block for name in unit.layers)

    @torch.no_grad()
    def _reach(self, index: int) -> None:
        if index < self.index:
            raise ValueError("GPTQ sensitivities must be measured in block order")
        if index == self.index:
            return
        began = time.perf_counter()
        self.hessians, self.factors = {}, {}
        while self.index < index:
            if self.index >= 0:
                self.inputs.advance(self.blocks[self.index])  # the original block
            self.index += 1
        block_name = f"{self.blocks_name}.{index}"
        block = self.blocks[index]
        layers = block_layers(block_name, block, self.layers_of.get(block_name, []))
        found = input_hessians(block, layers, self.inputs)
        self.hessians = {block_name + "." + name: h for name, h in found.items()}
        self.seconds += time.perf_counter() - began

    @torch.no_grad()
    def quantize(self, unit: Unit, option: GptqConfig) -> None:
        block = block_of(unit.layers[0])
        self._reach(int(block.rsplit(".", 1)[1]))
        for name in unit.layers:
            hessian = self.hessians[name]
            key = (id(hessian), option.damping, option.act_order)
            if key not in self.factors:
                began = time.perf_counter()
                self.factors[key] = inverse_hessian_factor(
                    hessian, option.damping, act_order=option.act_order, method="GPTQ", layer=name
                )
                self.seconds += time.perf_counter() - began
            layer = self.model.get_submodule(name)
            attach(layer, quantize_with(option, layer.weight, self.factors[key], layer=name))


def summary(
    units: list[Unit], options: list[SearchableStage | None], measured: dict, *, cached: bool
) -> dict:
    """What report.json shows: the options, each unit's losses, the most sensitive units."""
    labels = [_label(option) for option in options]
    per_unit = {
        unit.name: dict(zip(labels, row, strict=True))
        for unit, row in zip(units, measured["losses"], strict=True)
    }
    cheapest = [row[0] for row in measured["losses"]]
    ranked = sorted(range(len(units)), key=lambda i: -cheapest[i])
    return {
        "proxy_units": "KL per token (causal LM) or 1 - cosine (encoder)",
        "options": labels,
        "units": per_unit,
        "most_sensitive": [units[i].name for i in ranked[:5]],
        "seconds": measured["seconds"],
        "cached": cached,
    }


def _label(option: SearchableStage | None) -> str:
    if option is None:
        return "float"
    if isinstance(option, W8A8Config):
        return f"w8a8 {option.activations}"
    group = "channel" if option.group_size == -1 else f"g{option.group_size}"
    return f"{option.method} {option.bits}-bit {group}"


def _restore(model: nn.Module, saved: dict, state: dict | None) -> None:
    if state is not None:
        model.load_state_dict(state)
    for name, weight in saved.items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(weight)
        if hasattr(linear, ATTRIBUTE):
            delattr(linear, ATTRIBUTE)
