"""Layer-by-layer calibration (DESIGN.md principle 6), shared by every calibration-based method.

The calibration batch goes through one block (decoder or encoder layer) at a time:

1. The model runs on the calibration ids until its first block is called; a pre-forward hook
   records what the block receives (hidden states plus the keyword arguments the model computes
   for it: attention mask, RoPE `position_embeddings`, position ids, ...) and stops the forward
   pass by raising. Only the embeddings run.
2. For each block, a handler gets the block and its inputs. It may run the block on the inputs
   with hooks on its layers to collect statistics (`linear_inputs`, `input_hessians`), and change
   the block's weights (GPTQ quantizes them, SparseGPT prunes, SmoothQuant rescales).
3. The changed block runs on the inputs; its outputs become the next block's inputs, so each block
   is calibrated on what the already-compressed blocks before it produce (as in GPTQ).

Memory: the model's weights, one block's inputs (samples x seq_len x hidden, outputs overwrite
them chunk by chunk) and whatever statistics the handler keeps for one block.

Resume: after each block the caller's `BlockCheckpoint` (the service keeps it in storage) gets the
block's new state and the next block's hidden states. A rerun loads the finished blocks' states
instead of recomputing them and continues from the saved hidden states; the other block inputs
(masks, position embeddings) do not change from block to block and are captured again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from workers.compression import process_memory
from workers.compression.layer_selection import block_prefix
from workers.compression.quant import ATTRIBUTE, LAZY, QuantizedWeight, dequantize
from workers.compression.streaming import (
    BlockStore,
    drop_skeleton_pages,
    first_block_call,
    store_of,
)

# Calibration samples of one length are run through a block together, up to this many tokens:
# big enough to keep the matrix multiplies efficient, small enough that one chunk's activations
# (x the MLP width) stay a small part of memory: 2048 x 11008 floats is 90 MB for a 7B MLP (four
# times that at 8192 tokens; on SmolLM2 GPTQ 64 x 512 streamed, the peak RSS of a block fell from
# 879 to 787 MB). Fixed, so results do not depend on the machine.
CHUNK_TOKENS = 2048


@dataclass
class BlockInputs:
    """What one block receives for the whole calibration batch, in chunks of samples: `hidden[i]`
    is [samples, seq_len, hidden] and `args[i]` / `kwargs[i]` the other arguments for it."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.shape[0] * chunk.shape[1] for chunk in self.hidden)

    def run(self, block: nn.Module) -> None:
        """Run `block` on every chunk, discarding the outputs (hooks collect what they need)."""
        for hidden, args, kwargs in zip(self.hidden, self.args, self.kwargs, strict=True):
            block(hidden, *args, **kwargs)

    def advance(self, block: nn.Module) -> None:
        """Replace each chunk's hidden states by the block's output: the next block's inputs."""
        for index, (args, kwargs) in enumerate(zip(self.args, self.kwargs, strict=True)):
            output = block(self.hidden[index], *args, **kwargs)
            # transformers 5 blocks return a tensor; older ones a tuple led by the hidden states.
            self.hidden[index] = output[0] if isinstance(output, tuple) else output


class SavedProgress(NamedTuple):
    next_block: int  # blocks [0, next_block) are finished
    block_states: dict[int, dict[str, torch.Tensor]]  # block index -> `block_state` of it
    summaries: dict[int, dict]  # block index -> what the handler returned for it
    hidden: list[torch.Tensor]  # the inputs of block `next_block`, chunk by chunk


class BlockCheckpoint(Protocol):
    """Where a blockwise run records progress, so that a killed job resumes from its last finished
    block. Everything saved is a plain tensor or a JSON-able dict (safetensors + JSON in storage);
    the implementation must make each `save` atomic, and key it by model, data and recipe."""

    def load(self) -> SavedProgress | None: ...

    def save(
        self,
        *,
        next_block: int,
        block_state: dict[str, torch.Tensor],
        summary: dict,
        hidden: list[torch.Tensor],
    ) -> None:
        """Block `next_block - 1` is finished with `block_state`; `hidden` is the next input."""


Handler = Callable[[int, str, nn.Module, BlockInputs], dict]
Progress = Callable[[int, int, str], None]  # (step, total_steps, message), e.g. StageContext.report


def model_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's repeated blocks."""
    name = block_prefix(model).rstrip(".")
    return name, model.get_submodule(name)


def block_layers(block_name: str, block: nn.Module, targeted: list[str]) -> dict[str, nn.Module]:
    """The targeted layers inside `block`, by their names relative to it."""
    prefix = block_name + "."
    return {
        name[len(prefix) :]: block.get_submodule(name[len(prefix) :])
        for name in targeted
        if name.startswith(prefix)
    }


def outside_blocks(model: nn.Module, names: list[str]) -> list[str]:
    """The names that are not inside one of the model's blocks (a blockwise pass never sees them)."""
    blocks_name, blocks = model_blocks(model)
    inside = tuple(f"{blocks_name}.{index}." for index in range(len(blocks)))
    return [name for name in names if not name.startswith(inside)]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _chunks(calibration: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive samples of one length stacked into [n, seq_len] batches of <= CHUNK_TOKENS."""
    chunks: list[list[torch.Tensor]] = []
    for ids in calibration:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(
                f"calibration samples must be [1, seq_len] ids, got {tuple(ids.shape)}"
            )
        current = chunks[-1] if chunks else None
        if (
            current is not None
            and current[0].shape[1] == ids.shape[1]
            and (len(current) + 1) * ids.shape[1] <= CHUNK_TOKENS
        ):
            current.append(ids)
        else:
            chunks.append([ids])
    return [torch.cat(chunk) for chunk in chunks]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calibration: list[torch.Tensor]) -> BlockInputs:
    """The first block's inputs for the calibration batch: the model runs only up to that block."""
    if not calibration:
        raise ValueError("calibration data is empty")
    _, blocks = model_blocks(model)
    device = model_device(model)
    # No KV cache: the block is called once per chunk, and a cache would carry keys across them.
    extra = (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )
    inputs = BlockInputs(hidden=[], args=[], kwargs=[])
    for ids in _chunks(calibration):
        call = first_block_call(model, blocks, {"input_ids": ids.to(device), **extra})
        inputs.hidden.append(call.hidden)
        inputs.args.append(call.args)
        inputs.kwargs.append(call.kwargs)
    return inputs


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a method changes in a block: its state dict plus the exact integers of its
    weight-only quantized layers (`quant.ATTRIBUTE`), as plain tensors."""
    state = dict(block.state_dict())
    for name, module in block.named_modules():
        quantized = getattr(module, ATTRIBUTE, None)
        if isinstance(quantized, QuantizedWeight):
            state.update(quantized.to_tensors(f"{name}.{ATTRIBUTE}."))
        if getattr(module, LAZY, False):  # a lazy layer's weight, in float32 as if eager
            weight = module.weight
            if weight.device.type == "meta":
                weight = dequantize(quantized)
            state[f"{name}.weight"] = weight.detach().to(torch.float32)
    return state


def restore_block_state(block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    plain = {key: value for key, value in state.items() if f"{ATTRIBUTE}." not in key}
    block.load_state_dict(plain, strict=True)
    device = model_device(block)
    for name, module in block.named_modules():
        prefix = f"{name}.{ATTRIBUTE}."
        if f"{prefix}codes" in state:
            quantized = QuantizedWeight.from_tensors(state, prefix)
            quantized.codes = quantized.codes.to(device)
            quantized.scale = quantized.scale.to(device)
            if quantized.zero_point is not None:
                quantized.zero_point = quantized.zero_point.to(device)
            setattr(module, ATTRIBUTE, quantized)


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    calibration: list[torch.Tensor],
    handler: Handler,
    *,
    progress: Progress,
    checkpoint: BlockCheckpoint | None = None,
    restore: Callable[[int, nn.Module, dict[str, torch.Tensor]], None] | None = None,
    handler_advances: bool = False,
) -> list[dict]:
    """Calibrate `model` block by block with `handler` (see the module docstring); the handlers'
    summaries in block order. `progress` is called after every block and may raise to cancel.
    `handler_advances`: the handler leaves `inputs` holding the block's outputs itself (a method
    whose change to the block leaves its outputs as they were, like SmoothQuant's exact rescaling,
    collects its statistics while advancing: one pass over the block instead of two).
    `restore(index, block, state)` puts a finished block's saved state back when resuming; the
    default loads it into the block as it is, so a handler that replaces modules (w8a8, structured
    pruning) passes one that first rebuilds them in their new form."""
    blocks_name, blocks = model_blocks(model)
    store = store_of(model)  # a streamed model: one block resident at a time, the rest on disk
    inputs = capture_block_inputs(model, calibration)
    drop_skeleton_pages(model)  # the embedding rows the capture read
    summaries: dict[int, dict] = {}
    first = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        if [tuple(h.shape) for h in saved.hidden] != [tuple(h.shape) for h in inputs.hidden]:
            raise ValueError("the checkpoint's hidden states do not match this calibration data")
        for index in range(saved.next_block):
            with resident_block(store, blocks, index) as block:
                (restore or _restore_as_is)(index, block, saved.block_states[index])
        summaries.update(saved.summaries)
        device = model_device(model)
        inputs.hidden = [hidden.to(device) for hidden in saved.hidden]
        first = saved.next_block

    lazy = getattr(handler, "lazy_block", False)
    for index in range(first, len(blocks)):
        name = f"{blocks_name}.{index}"
        with resident_block(store, blocks, index, lazy=lazy) as block:
            summaries[index] = handler(index, name, block, inputs)
            if not handler_advances:
                inputs.advance(block)
            if checkpoint is not None:
                checkpoint.save(
                    next_block=index + 1,
                    block_state=block_state(block),
                    summary=summaries[index],
                    hidden=list(inputs.hidden),
                )
        release_freed_memory(model_device(model))
        # The job's one ETA is computed from these steps (workers/progress_plan.py), not here.
        progress(index + 1, len(blocks), f"calibrated {name}")
    return [summaries[index] for index in range(len(blocks))]


@contextmanager
def resident_block(
    store: BlockStore | None, blocks: nn.ModuleList, index: int, *, lazy: bool = False
) -> Iterator[nn.Module]:
    """Block `index`, onloaded for the body and its changes kept when the model is streamed
    (`lazy`: its Linear weights as stored, see `BlockStore.onload`)."""
    if store is None:
        yield blocks[index]
        return
    with store.resident(index, lazy=lazy) as block:
        yield block


def _restore_as_is(index: int, block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    restore_block_state(block, state)


def release_freed_memory(device: torch.device) -> None:
    """Hand freed CPU memory back to the OS (glibc's malloc_trim). Each block's activations are
    freed, but glibc keeps much of that memory for reuse, fragmented; trimming after each block
    keeps the process at one block's worth (measured on SmolLM2: peak RSS 1.47 GB, not 1.79)."""
    if device.type == "cpu":
        process_memory.trim()


@contextmanager
def linear_inputs(
    block: nn.Module, layers: dict[str, nn.Linear], observe: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """While active, `observe(name, x)` sees every input x [tokens, in_features] of each named
    layer of `block` (run the block with `BlockInputs.run` inside)."""

    def hook(name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            observe(name, x.reshape(-1, x.shape[-1]))

        return forward_hook

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_hessians(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    inputs: BlockInputs,
    *,
    abs_means: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """H = 2 XᵀX / tokens [in, in] (float32) of each named layer's calibration inputs X, from one
    run of `block` (GPTQ's and SparseGPT's Hessian; dividing by the token count keeps the numbers
    in range and changes nothing else, as their damping is relative to the diagonal). Given a dict,
    `abs_means` also receives each layer's mean |x_j| per input channel (AWQ's saliency).

    Layers fed the same tensor (q/k/v, gate/up) share one Hessian, the same tensor object (treat
    the results as read-only): a layer whose input is, on every chunk, the very tensor the layer
    before it saw, unchanged since (same memory, shape and version counter), adds nothing and
    keeps no matrix of its own — on a 7B block, 4 of its 7 [in, in] matrices.
    """
    hessians: dict[str, torch.Tensor] = {}
    leader_of: dict[str, str] = {}  # a layer fed its leader's very input -> that leader
    previous: dict = {}
    first_chunk = True

    def accumulate(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x._version)
        # `previous` holds the last input, so its memory cannot be reused by another tensor.
        same = previous.get("key") == key
        if first_chunk and same:
            leader_of[name] = leader_of.get(previous["name"], previous["name"])
        if name in leader_of:
            if not same:
                raise RuntimeError(f"{name} was fed its leader's input on one chunk, not another")
            previous["name"] = name
            return
        if not same:
            x32 = x.float()
            previous.update(key=key, input=x, product=x32.T @ x32, taken=False)
            if abs_means is not None:
                previous["abs_sum"] = x32.abs().sum(dim=0)
        previous["name"] = name
        if name in hessians:
            hessians[name].add_(previous["product"])
        elif previous["taken"]:
            hessians[name] = previous["product"].clone()
        else:
            # The first chunk's product becomes the sum itself: no second [in, in] matrix (on a
            # 7B down projection, 485 MB less at the block's peak).
            hessians[name] = previous["product"]
            previous["taken"] = True
        if abs_means is not None:
            total = abs_means.get(name)
            abs_means[name] = previous["abs_sum"] if total is None else total + previous["abs_sum"]

    with linear_inputs(block, layers, accumulate):
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
            block(hidden, *args, **kwargs)
            first_chunk = False
            previous.clear()
    for hessian in hessians.values():
        hessian.mul_(2 / inputs.num_tokens)
    for follower, leader in leader_of.items():
        hessians[follower] = hessians[leader]
        if abs_means is not None:
            abs_means[follower] = abs_means[leader]
    if abs_means is not None:
        for name in abs_means:
            abs_means[name] = abs_means[name] / inputs.num_tokens
    for name, layer in layers.items():  # a layer the block never called saw nothing
        if name not in hessians:
            hessians[name] = torch.zeros(
                layer.in_features, layer.in_features, device=layer.weight.device
            )
    return hessians
