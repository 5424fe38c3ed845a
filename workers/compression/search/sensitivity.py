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

from workers.compression.engine import compress
from workers.compression.evaluation import linear_layer_names
from workers.compression.quant import ATTRIBUTE
from workers.compression.recipe import Recipe, WeightOnlyConfig
from workers.compression.search.space import Unit, block_of

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
    *, model_sha: str, options: list[WeightOnlyConfig | None], units: list[Unit], data_sha: str
) -> str:
    described = json.dumps(
        {
            "model": model_sha,
            "options": [None if o is None else o.model_dump(mode="json") for o in options],
            "units": [[unit.name, list(unit.layers)] for unit in units],
            "data": data_sha,
            "proxy": 1,
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
    options: list[WeightOnlyConfig | None],
    proxy: Proxy,
    *,
    calibration: list[torch.Tensor] | None,
    on_step: Callable[[int, int, str], None] | None = None,
) -> dict:
    """{"losses": [[proxy distance per option] per unit], "seconds": ...}; float (None) is 0."""
    started = time.perf_counter()
    losses = []
    steps = len(units) * sum(option is not None for option in options)
    step = 0
    for unit in units:
        row = []
        for option in options:
            if option is None:
                row.append(0.0)
                continue
            saved = {
                name: model.get_submodule(name).weight.detach().clone() for name in unit.layers
            }
            state = (
                {k: v.detach().clone() for k, v in model.state_dict().items()}
                if option.rescales_weights
                else None
            )
            alone = Recipe(
                stages=[option.model_copy(update={"modules": list(unit.layers), "ignore": []})]
            )
            compress(model, alone, calibration)
            row.append(proxy.distance(model, start=block_of(unit.layers[0])))
            _restore(model, saved, state)
            step += 1
            if on_step is not None:
                on_step(step, steps, f"sensitivity of {unit.name} at {_label(option)}")
        losses.append(row)
    return {"losses": losses, "seconds": round(time.perf_counter() - started, 3)}


def summary(
    units: list[Unit], options: list[WeightOnlyConfig | None], measured: dict, *, cached: bool
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


def _label(option: WeightOnlyConfig | None) -> str:
    if option is None:
        return "float"
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
