"""Models larger than memory: the blocks stay on disk, one at a time is resident (DESIGN 6).

A streamed model is an ordinary transformers module whose repeated blocks (decoder or encoder
layers) hold no memory: their parameters live on the `meta` device, and a `BlockStore` attached to
the model (`model.slimformer_blocks`) knows where each block's tensors are — in the checkpoint's
own safetensors shards at first, in the store's scratch files once a stage has changed them. What
lies outside the blocks (embeddings, final norm, LM head: the "skeleton") is materialised on the
compute device in float32, as it is used at every forward pass.

    with store.resident(index) as block:   # the block's tensors in float32 on the compute device
        ...                                # calibrate, quantize, prune, run activations through it
                                           # leaving: changed tensors written to scratch, the rest
                                           # still read from the checkpoint; the block is meta again

Memory on the device and in host RAM is therefore the skeleton + one block in float32 + what the
caller keeps (one block's calibration activations and statistics), whatever the depth. Tensors are
read with safetensors' memory map, so a read costs page cache (which the kernel reclaims), not
process memory; a tensor a stage did not change is never written again.

The working precision is float32 whatever the checkpoint's dtype: a bf16 checkpoint's tensors are
upcast one block at a time as they are onloaded, and written back in bf16 when nothing changed them
(the export reads untouched tensors from their source). What a stage did change is kept exactly as
it left it (float32 values, int8 codes), except a weight-only layer's dequantized weight, which is
not stored at all: it is recomputed from the codes, which are the truth.

A forward pass of the whole streamed model (`stream_forward`) runs every input through one
resident block at a time: inputs of the first block are captured once, advanced block by block,
and the model's own head (final norm, LM head, pooling) is then run on the last block's outputs by
replaying them through the model with its blocks stubbed out.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from workers.compression.layer_selection import block_prefix
from workers.compression.quant import ATTRIBUTE, LAZY, QuantizedWeight, dequantize
from workers.compression.shards import read_header, write_file

STORE_ATTRIBUTE = "slimformer_blocks"
DTYPE_ATTRIBUTE = "slimformer_checkpoint_dtype"


@dataclass(frozen=True)
class TensorSource:
    """One tensor in a safetensors file; `original`: the checkpoint's own (upcast on load)."""

    path: Path
    key: str
    original: bool


class BlockStore:
    """Where a streamed model's block tensors are between uses; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        sources: dict[int, dict[str, TensorSource]],
        *,
        device: torch.device,
        scratch: Path | None = None,
    ) -> None:
        self.blocks_name = block_prefix(model).rstrip(".")
        self.blocks: nn.ModuleList = model.get_submodule(self.blocks_name)
        self.sources = sources
        self.device = torch.device(device)
        self._owns_scratch = scratch is None
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="slimformer-blocks-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._versions: dict[int, int] = {}
        self._resident: dict[int, dict[str, Any]] = {}  # index -> tensor identity at onload
        weakref.finalize(self, _remove, self.scratch if self._owns_scratch else None)

    def __len__(self) -> int:
        return len(self.blocks)

    @contextmanager
    def resident(
        self, index: int, *, keep_changes: bool = True, lazy: bool = False
    ) -> Iterator[nn.Module]:
        """Block `index` materialised on the device for the body; afterwards its changes are kept
        (written to scratch) unless `keep_changes` is False, and it holds no memory again.
        `lazy`: its Linear layers stay as stored (see `onload`)."""
        block = self.onload(index, lazy=lazy)
        try:
            yield block
        except BaseException:
            self.offload(index, keep_changes=False)
            raise
        self.offload(index, keep_changes=keep_changes)

    def onload(self, index: int, *, lazy: bool = False) -> nn.Module:
        """Block `index` on the device, in float32 working precision. `lazy`: its plain Linear
        layers keep their weights as stored (the checkpoint's dtype, memory-mapped from their
        file, each in a mapping of its own) and upcast them only inside their forward, and a
        weight-only quantized layer holds no dequantized weight (its forward dequantizes the
        codes): one Linear at a time is in float32. A method reads a lazy layer's weight with
        `working_weight` and changes it with `set_weight` / `quant.attach`."""
        block = self.blocks[index]
        if index in self._resident:
            return block
        linears = {name for name, module in block.named_modules() if type(module) is nn.Linear}
        separate = {f"{name}.weight" for name in linears} if lazy else set()
        state = self.read_state(index, device=self.device, working=True, separate=separate)
        quantized = _take_quantized(state)
        for name, q in quantized.items():
            # Not stored: the dequantized weight is a function of the codes (`quant.attach`).
            if lazy and name in linears:
                state[f"{name}.weight"] = torch.empty(q.codes.shape, device="meta")
            else:
                state[f"{name}.weight"] = dequantize(q).to(torch.float32)
        block.load_state_dict(state, strict=True, assign=True)
        del state
        for name, q in quantized.items():
            setattr(block.get_submodule(name), ATTRIBUTE, q)
        if lazy:
            for name in linears:
                make_lazy(block.get_submodule(name))
        self._resident[index] = _identities(block)
        return block

    def materialize(self, index: int, name: str) -> nn.Module:
        """Layer `name` of resident block `index` with its weight in float32 (an unchanged copy
        of what is stored: not written back unless changed), for a method to read and change."""
        layer = self.blocks[index].get_submodule(name)
        weight = layer.weight
        if getattr(layer, ATTRIBUTE, None) is None and weight.dtype != torch.float32:
            layer.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
            key = f"{name}.weight"
            if index in self._resident and key in self._resident[index]:
                self._resident[index][key] = (weakref.ref(layer.weight), _version(layer.weight))
        return layer

    def release(self, index: int, name: str) -> None:
        """After a method is done with layer `name` (`materialize`): an unchanged weight goes
        back to its stored form, memory-mapped; a changed one stays until the block is offloaded
        (and kept then); a quantized layer holds its codes only (`quant.attach`)."""
        layer = self.blocks[index].get_submodule(name)
        key = f"{name}.weight"
        before = self._resident.get(index, {}).get(key)
        if type(layer) is not nn.Linear or not getattr(layer, LAZY, False):
            return
        if not _same(before, layer.weight) or key not in self.sources[index]:
            return
        if layer.weight.dtype == torch.float32 and self.sources[index][key].original:
            stored = self.read_state(index, device=self.device, separate={key}, only={key})[key]
            if stored.dtype != torch.float32:
                layer.weight = nn.Parameter(stored, requires_grad=False)
                self._resident[index][key] = (weakref.ref(layer.weight), _version(layer.weight))

    def offload(self, index: int, *, keep_changes: bool = True) -> None:
        block = self.blocks[index]
        before = self._resident.pop(index, None)
        if before is None:
            return
        if keep_changes:
            self._keep(index, block, before)
        _to_meta(block)
        from workers.compression.calibration import release_freed_memory

        release_freed_memory(self.device)

    def _keep(self, index: int, block: nn.Module, before: dict[str, Any]) -> None:
        tensors = _tracked_tensors(block)
        changed_keys = {
            key for key, tensor in tensors.items() if not _same(before.get(key), tensor)
        }
        changed = {
            key: tensors[key].detach().to("cpu").contiguous()
            for key in changed_keys
            if f".{ATTRIBUTE}." not in key
        }
        keys = {key for key in tensors if f".{ATTRIBUTE}." not in key}
        current = {key: tensors[key] for key in keys}
        for name, module in _quantized_modules(block):
            # A quantized layer is stored whole: codes, scale, zero point and format together.
            prefix = f"{name}.{ATTRIBUTE}."
            layer = getattr(module, ATTRIBUTE).to_tensors(prefix)
            keys |= set(layer)
            current.update(layer)
            if any(key.startswith(prefix) for key in changed_keys):
                changed.update({k: v.cpu().contiguous() for k, v in layer.items()})
        old = self.sources[index]
        if changed:
            # What the block still reads from an older scratch file moves into the new one, so
            # the older file is left unreferenced and deleted: a stage that changed a few small
            # tensors (SmoothQuant's norms) would otherwise keep a whole superseded file (its
            # float32 weights, which the next stage quantized) on disk for the rest of the job.
            for key in keys - changed.keys():
                source, tensor = old.get(key), current.get(key)
                scratch = source is not None and not source.original
                if scratch and tensor is not None and tensor.device.type != "meta":
                    changed[key] = tensor.detach().to("cpu").contiguous()
        sources = {key: old[key] for key in keys if key in old and key not in changed}
        if changed:
            version = self._versions.get(index, 0) + 1
            path = self.scratch / f"block-{index}-v{version}.safetensors"
            write_file(path, changed)
            self._versions[index] = version
            sources.update({key: TensorSource(path, key, original=False) for key in changed})
        self.sources[index] = sources
        self._drop_unreferenced(index, old)

    def _drop_unreferenced(self, index: int, old: dict[str, TensorSource]) -> None:
        live = {source.path for source in self.sources[index].values()}
        for path in {source.path for source in old.values() if not source.original} - live:
            path.unlink(missing_ok=True)

    def read_state(
        self,
        index: int,
        *,
        device: torch.device | str = "cpu",
        working: bool = False,
        separate: set[str] = frozenset(),
        only: set[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Block `index`'s stored tensors (quantized layers as codes, without their dequantized
        weight). `working`: the checkpoint's floating tensors upcast to float32, except those in
        `separate`, kept as stored and each read through a memory map of its own (one mapping
        is released, its pages with it, only when every tensor read through it is gone)."""
        state = {}
        by_file: dict[Path, list[tuple[str, TensorSource]]] = {}
        for key, source in self.sources[index].items():
            if only is not None and key not in only:
                continue
            if key in separate:
                with safe_open(source.path, "pt") as stored:
                    state[key] = stored.get_tensor(source.key).to(device)
                continue
            by_file.setdefault(source.path, []).append((key, source))
        for path, entries in by_file.items():
            with safe_open(path, "pt") as stored:
                for key, source in entries:
                    tensor = stored.get_tensor(source.key)
                    if working and source.original and tensor.is_floating_point():
                        tensor = tensor.to(torch.float32)
                    state[key] = tensor.to(device)
        return state

    def replace_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Make `state` (as `calibration.block_state` returns it) block `index`'s stored tensors:
        a finished block put back from a resume checkpoint."""
        block = self.onload(index)
        from workers.compression.calibration import restore_block_state

        restore_block_state(block, state)
        self.offload(index)

    def put(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Make `state` (as `calibration.block_state` returns it) block `index`'s stored tensors
        without onloading what is stored now: a block whose shapes changed (structured pruning,
        resumed) cannot be onloaded from its old tensors. Its modules must already have the
        shapes of `state`."""
        if index in self._resident:
            raise RuntimeError(f"block {index} is resident: change it in place instead")
        quantized = {key.split(f".{ATTRIBUTE}.")[0] for key in state if f".{ATTRIBUTE}." in key}
        tensors = {
            key: value.detach().to("cpu").contiguous()
            for key, value in state.items()
            # A quantized layer's weight is a function of its codes: not stored (see `onload`).
            if key.removesuffix(".weight") not in quantized
        }
        version = self._versions.get(index, 0) + 1
        path = self.scratch / f"block-{index}-v{version}.safetensors"
        write_file(path, tensors)
        self._versions[index] = version
        old = self.sources[index]
        self.sources[index] = {key: TensorSource(path, key, original=False) for key in tensors}
        self._drop_unreferenced(index, old)

    def close(self) -> None:
        for index in list(self._resident):
            self.offload(index, keep_changes=False)
        if self._owns_scratch:
            _remove(self.scratch)


def _remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype the model's checkpoint stores its weights in (`loading.load_model` records it;
    float32 for a model built otherwise)."""
    return getattr(model, DTYPE_ATTRIBUTE, torch.float32)


def in_precision(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 weight a method computed anew (SparseGPT's updated weights), rounded to what
    the checkpoint's `dtype` holds and kept in float32: the model measured is the model exported,
    and the export writes it back in the checkpoint's dtype (a bf16 model pruned stays the size
    of a bf16 model, as one pruned in bf16 by llm-compressor does), not in float32."""
    if dtype == torch.float32 or not weight.is_floating_point():
        return weight
    return weight.to(dtype).to(weight.dtype)


def store_of(model: nn.Module) -> BlockStore | None:
    """The model's block store, or None for a model held whole in memory."""
    return getattr(model, STORE_ATTRIBUTE, None)


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers by state-dict name (the objects themselves)."""
    tensors = {}
    for prefix, child in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in child._parameters.items():
            if param is not None:
                tensors[dot + name] = param
        for name, buffer in child._buffers.items():
            if buffer is not None and name not in child._non_persistent_buffers_set:
                tensors[dot + name] = buffer
    return tensors


def _tracked_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """What the store keeps of a block, by key: its state tensors, except the dequantized weight
    of a weight-only layer (derived from its codes), plus those layers' codes, scales and zero
    points under `<layer>.<ATTRIBUTE>.`, as `QuantizedWeight.to_tensors` names them."""
    tensors = _state_tensors(block)
    for name, module in _quantized_modules(block):
        quantized = getattr(module, ATTRIBUTE)
        del tensors[f"{name}.weight"]
        prefix = f"{name}.{ATTRIBUTE}."
        tensors[f"{prefix}codes"] = quantized.codes
        tensors[f"{prefix}scale"] = quantized.scale
        if quantized.zero_point is not None:
            tensors[f"{prefix}zero_point"] = quantized.zero_point
    return tensors


def _identities(block: nn.Module) -> dict[str, Any]:
    return {key: (weakref.ref(t), _version(t)) for key, t in _tracked_tensors(block).items()}


def _version(tensor: torch.Tensor) -> int | None:
    # Tensors made under inference mode keep no version counter; nothing writes to them in place.
    try:
        return tensor._version
    except RuntimeError:
        return None


def _same(before: Any, tensor: torch.Tensor) -> bool:
    """Whether `tensor` is the very tensor onloaded, unchanged since (no in-place write)."""
    if before is None:
        return False
    ref, version = before
    return ref() is tensor and _version(tensor) == version


def _quantized_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if getattr(m, ATTRIBUTE, None) is not None]


def _take_quantized(state: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """Remove the weight-only layers' codes from `state`; {layer name: its QuantizedWeight}."""
    marker = f".{ATTRIBUTE}."
    prefixes = {key[: key.index(marker) + len(marker)] for key in state if marker in key}
    quantized = {}
    for prefix in sorted(prefixes):
        quantized[prefix[: -len(marker)]] = QuantizedWeight.from_tensors(state, prefix)
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
    return quantized


def make_lazy(layer: nn.Linear) -> None:
    """Let `layer` compute in float32 from its weight as stored (or, quantized with its weight
    on the meta device, from its codes): this instance's forward upcasts one layer at a time."""
    setattr(layer, LAZY, True)
    layer.forward = _InstanceForward(_lazy_linear, layer)


class _InstanceForward:
    """`function` as one module instance's forward, holding the module weakly: a bound method
    would make a reference cycle (module -> forward -> module), so a layer that a stage replaces
    (W8A8, FP8, dynamic int8 swap in modules of their own) would keep its weight, memory-mapped
    or upcast, until the next garbage collection instead of freeing it as it leaves the block
    (measured: a 1.24B bf16 model's SmoothQuant + W8A8 held 3.8 GB of scratch pages mapped after
    compressing), and a finished job's LM head would outlive its model."""

    __slots__ = ("function", "module")

    def __init__(self, function: Callable[..., torch.Tensor], module: nn.Module) -> None:
        self.function, self.module = function, weakref.ref(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(self.module(), x)

    def __deepcopy__(self, memo: dict) -> _InstanceForward:
        # A copied module's forward is bound to the copy (as a copied bound method would be).
        return _InstanceForward(self.function, copy.deepcopy(self.module(), memo))


def _lazy_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if weight.device.type == "meta":
        weight = dequantize(getattr(self, ATTRIBUTE)).to(x.dtype)
    elif weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    bias = self.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def working_weight(layer: nn.Linear) -> torch.Tensor:
    """`layer`'s weight in float32: the weight itself when it is float32 (a layer of a model
    held whole, or of an eagerly onloaded block), else an upcast copy (a lazy layer's)."""
    weight = layer.weight.detach()
    if weight.device.type == "meta":
        return dequantize(getattr(layer, ATTRIBUTE)).to(torch.float32)
    return weight.float()


def set_weight(layer: nn.Linear, weight: torch.Tensor) -> None:
    """Make `weight` (float32) `layer`'s weight: written in place into a float32 weight, or
    replacing a lazy layer's stored one (which a copy would round to its dtype)."""
    with torch.no_grad():
        if layer.weight.dtype == torch.float32 and layer.weight.device.type != "meta":
            layer.weight.copy_(weight)
        else:
            layer.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)


def _to_meta(block: nn.Module) -> None:
    """Drop the block's tensors (parameters, persistent buffers, attached codes): meta again."""
    for _, child in block.named_modules():
        if getattr(child, LAZY, False):
            delattr(child, LAZY)
            child.__dict__.pop("forward", None)
        for name, param in list(child._parameters.items()):
            if param is not None:
                child._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buffer in list(child._buffers.items()):
            if buffer is not None and name not in child._non_persistent_buffers_set:
                child._buffers[name] = torch.empty_like(buffer, device="meta")
        quantized = getattr(child, ATTRIBUTE, None)
        if quantized is not None:
            # Kept as a description (bits, group size, shapes) for the export to read its scheme.
            quantized.codes = torch.empty_like(quantized.codes, device="meta")
            quantized.scale = torch.empty_like(quantized.scale, device="meta")
            if quantized.zero_point is not None:
                quantized.zero_point = torch.empty_like(quantized.zero_point, device="meta")


# --- loading ----------------------------------------------------------------------------------


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it}, from the index or the single file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / filename for name, filename in weight_map.items()}
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as stored:
            files.update({key: path for key in stored.keys()})  # noqa: SIM118
    return files


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint's floating tensors are stored in (the most common one, by bytes)."""
    totals: dict[str, int] = {}
    for path in set(checkpoint_files(folder).values()):
        header, _ = read_header(path)
        for key, entry in header.items():
            if key != "__metadata__" and entry["dtype"] in _FLOAT_DTYPES:
                start, end = entry["data_offsets"]
                totals[entry["dtype"]] = totals.get(entry["dtype"], 0) + end - start
    if not totals:
        return torch.float32
    return _FLOAT_DTYPES[max(totals, key=totals.get)]


_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def build_streamed(
    model_class: Any,
    config: Any,
    folder: Path,
    *,
    device: torch.device,
    scratch: Path | None = None,
) -> nn.Module:
    """The model of `folder` with its skeleton in float32 on `device` and its blocks on disk."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=torch.float32)
    # Older checkpoints store buffers that are computed now (BERT's `position_ids`): not loaded.
    computed = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    files = {k: v for k, v in checkpoint_files(folder).items() if k not in computed}
    blocks_name = block_prefix(model)
    expected = set(model.state_dict())
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    stored = set(files)
    missing = [k for k in expected - stored if not (k in tied and tied[k] in stored)]
    unexpected = sorted(stored - expected)
    if missing or unexpected:
        from workers.compression.loading import UnsupportedModelError

        raise UnsupportedModelError(
            f"weights do not match {type(model).__name__}: "
            f"unexpected {unexpected[:5]}, missing {sorted(missing)[:5]}"
        )
    sources: dict[int, dict[str, TensorSource]] = {
        i: {} for i in range(len(model.get_submodule(blocks_name.rstrip("."))))
    }
    skeleton: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in sorted(by_file.items()):
        with safe_open(path, "pt") as checkpoint:
            for key in keys:
                if key.startswith(blocks_name):
                    index, relative = key[len(blocks_name) :].split(".", 1)
                    sources[int(index)][relative] = TensorSource(path, key, original=True)
                else:
                    tensor = checkpoint.get_tensor(key)
                    if tensor.is_floating_point() and tensor.numel() < NATIVE_SKELETON_NUMEL:
                        tensor = tensor.to(torch.float32)
                    skeleton[key] = tensor.to(device)
    model.load_state_dict(skeleton, strict=False, assign=True)
    if tied:
        model.tie_weights()
    compute_in_float32(model)
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != "meta" and not name.startswith(blocks_name):
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner)._buffers[attribute] = buffer.to(device)
    model.eval()
    store = BlockStore(model, sources, device=device, scratch=scratch)
    setattr(model, STORE_ATTRIBUTE, store)
    return model


# Outside the blocks, tensors this large (the embeddings and the LM head: a quarter of a 1B
# model) stay in the checkpoint's dtype and compute in float32 (`compute_in_float32`); smaller ones
# (norms, position embeddings) are simply upcast.
NATIVE_SKELETON_NUMEL = 1 << 20
_HEAD_ROWS = 8192  # output rows of the head upcast at a time: 8192 x hidden x 4 bytes


def compute_in_float32(model: nn.Module) -> None:
    """Embeddings and head kept in a narrower dtype still compute in float32: the input
    embedding's output is upcast (exact: a lookup), and the head multiplies by its weight upcast
    a slice of rows at a time (never the whole matrix in float32)."""
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.dtype != torch.float32:
        embeddings.register_forward_hook(lambda module, args, output: output.float())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and head.weight.dtype != torch.float32:
        head.forward = _InstanceForward(_float32_linear, head)


def _float32_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    parts = []
    clean = unwritten(self.weight)  # checked on the weight: a slice taken in inference mode
    for rows in self.weight.split(_HEAD_ROWS):  # has no version counter of its own
        parts.append(F.linear(x, rows.float()))
        if clean:  # a memory-mapped head is read a slice at a time, not held whole
            drop_pages(rows, checked=True)
    out = torch.cat(parts, dim=-1)
    return out if self.bias is None else out + self.bias.float()


def unwritten(tensor: torch.Tensor) -> bool:
    """Whether nothing ever wrote into `tensor` in place (version 0; an inference-mode tensor,
    which keeps no version counter, counts as written)."""
    try:
        return tensor._version == 0
    except RuntimeError:
        return False


def drop_pages(tensor: torch.Tensor, *, checked: bool = False) -> bool:
    """Take a memory-mapped tensor's pages out of the resident set once read
    (`process_memory.drop_file_pages`): only a CPU tensor read from a file and never written
    in place (`unwritten`, or `checked` by the caller on the tensor it is a slice of), so
    nothing but a clean copy of the file is dropped."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    if not (checked or unwritten(tensor)):
        return False
    from workers.compression import process_memory

    return process_memory.drop_file_pages(
        tensor.data_ptr(), tensor.numel() * tensor.element_size()
    )


def drop_skeleton_pages(model: nn.Module) -> None:
    """`drop_pages` for the large tensors outside the blocks (embeddings, head) of a streamed
    model: what a pass read of them leaves the resident set."""
    store = store_of(model)
    if store is None:
        return
    prefix = f"{store.blocks_name}."
    for key, tensor in _state_tensors(model).items():
        if not key.startswith(prefix) and tensor.numel() >= NATIVE_SKELETON_NUMEL:
            drop_pages(tensor.detach())


# --- running the whole model one block at a time ----------------------------------------------


class _FirstBlockReached(Exception):
    pass


@dataclass
class BlockCall:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def first_block_call(model: nn.Module, blocks: nn.ModuleList, call_kwargs: dict) -> BlockCall:
    """What the first block receives when `model(**call_kwargs)` runs: the model runs only up to
    it (a pre-forward hook records the hidden states and the other arguments the model computes
    for its blocks — masks, RoPE embeddings — and stops the pass)."""
    captured: list[BlockCall] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockCall(hidden, tuple(args[1:]), kwargs))
        raise _FirstBlockReached

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**call_kwargs)
    except _FirstBlockReached:
        return captured[0]
    finally:
        handle.remove()
    raise RuntimeError("the model finished a forward pass without calling its first block")


class _Skip(nn.Module):
    """Stands in for a block when replaying: hands its input on."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Emit(nn.Module):
    """Stands in for the last block when replaying: returns what the real blocks computed."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden


@torch.no_grad()
def stream_forward(
    model: nn.Module,
    calls: list[dict],
    finish: Callable[[int, Any], Any],
    *,
    on_step: Callable[[], None] | None = None,
    entry: nn.Module | None = None,
    blocks: int | None = None,
) -> list[Any]:
    """`finish(i, entry(**calls[i]))` for every call (`entry`: the model, or the part of it that
    holds the blocks, e.g. its base model), computed one resident block at a time; only the hidden
    states of all calls (and what `finish` returns) are kept between blocks. `blocks`: run only
    the first that many blocks, as a model of that depth would."""
    store = store_of(model)
    assert store is not None, "stream_forward needs a streamed model"
    entry = model if entry is None else entry
    all_blocks = store.blocks
    captured = [first_block_call(entry, all_blocks, kwargs) for kwargs in calls]
    drop_skeleton_pages(model)
    as_tuple = False
    for index in range(len(all_blocks) if blocks is None else blocks):
        if on_step is not None:
            on_step()
        with store.resident(index, keep_changes=False, lazy=True) as block:
            for call in captured:
                output = block(call.hidden, *call.args, **call.kwargs)
                as_tuple = isinstance(output, tuple)
                call.hidden = output[0] if as_tuple else output
    results = []
    parent_name, _, attribute = store.blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    try:
        for number, (kwargs, call) in enumerate(zip(calls, captured, strict=True)):
            stubs = [_Skip() for _ in range(len(all_blocks) - 1)] + [_Emit(call.hidden, as_tuple)]
            setattr(parent, attribute, nn.ModuleList(stubs))
            results.append(finish(number, entry(**kwargs)))
            call.hidden = None
            drop_skeleton_pages(model)
    finally:
        setattr(parent, attribute, all_blocks)
    return results


def resident_layers(
    model: nn.Module, names: list[str], *, keep_changes: bool = True
) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for each of `names` in order, its block resident while it is handled: a
    layer-local stage (RTN, magnitude pruning, dynamic int8, FP8) walks a streamed model this way.
    On a model held whole in memory it is `model.get_submodule` in a loop."""
    store = store_of(model)
    prefix = f"{store.blocks_name}." if store is not None else None
    current: int | None = None
    try:
        for name in names:
            if prefix is None or not name.startswith(prefix):
                yield name, model.get_submodule(name)
                continue
            index_text, relative = name[len(prefix) :].split(".", 1)
            index = int(index_text)
            if index != current:
                if current is not None:
                    store.offload(current, keep_changes=keep_changes)
                store.onload(index, lazy=True)
                current = index
            yield name, store.materialize(index, relative)
            store.release(index, relative)
    except BaseException:
        if current is not None:
            store.offload(current, keep_changes=False)
        raise
    if current is not None:
        store.offload(current, keep_changes=keep_changes)


@contextmanager
def parked_skeleton(model: nn.Module) -> Iterator[None]:
    """For the body, what lies outside the blocks holds no memory either: written to the store's
    scratch and put back after (a check that loads a second model beside this one needs the room)."""
    store = store_of(model)
    assert store is not None
    prefix = f"{store.blocks_name}."
    tensors = {k: v for k, v in _state_tensors(model).items() if not k.startswith(prefix)}
    if all(tensor.device.type == "meta" for tensor in tensors.values()):
        yield  # parked already (by a caller of the caller)
        return
    first_key: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in tensors.items():
        aliases[key] = first_key.setdefault(id(tensor), key)  # tied weights are stored once
    unique = {key: tensors[key].detach().cpu().contiguous() for key in set(aliases.values())}
    path = store.scratch / "skeleton.safetensors"
    write_file(path, unique)
    del unique
    for key, tensor in tensors.items():
        _assign(model, key, torch.empty_like(tensor, device="meta"))
    del tensors, tensor  # the loop variable too: it would keep the last tensor alive
    from workers.compression.calibration import release_freed_memory

    release_freed_memory(store.device)
    try:
        yield
    finally:
        with safe_open(path, "pt") as stored:
            loaded = {key: stored.get_tensor(key).to(store.device) for key in stored.keys()}  # noqa: SIM118
        wrapped: dict[str, torch.Tensor] = {}  # one object per stored tensor: ties stay ties
        for key, source in aliases.items():
            if source not in wrapped:
                wrapped[source] = _assign(model, key, loaded[source])
            else:
                _assign(model, key, wrapped[source])
        path.unlink(missing_ok=True)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Put `tensor` at state-dict name `key` (as a frozen Parameter where one was); what was put."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if name in owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        owner._parameters[name] = tensor
    else:
        owner._buffers[name] = tensor
    return tensor
