"""Loading Hugging Face model folders safely, and converting GGUF files into them.

Untrusted models are data, never code: weights come from safetensors only (never pickle or
`torch.load`), and `trust_remote_code` is always off, so a config that points at custom modelling
code is refused instead of executed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from workers.compression.device import select_device
from workers.compression.streaming import DTYPE_ATTRIBUTE, build_streamed, checkpoint_dtype


class UnsupportedModelError(ValueError):
    """The folder is not a model this engine can load (wrong architecture, no safetensors, ...)."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a transformers tokenizer
    task: str  # "causal-lm" or "feature-extraction"
    architecture: str  # e.g. "LlamaForCausalLM", "BertModel"
    folder: Path
    # The dtype the checkpoint stores its floating tensors in; the working precision is float32.
    dtype: torch.dtype = torch.float32


def task_of(architecture: str) -> str:
    """The engine's task for a transformers architecture class name."""
    if architecture.endswith("ForCausalLM"):
        return "causal-lm"
    if architecture.endswith("Model"):  # a bare encoder/decoder: BertModel, LlamaModel, ...
        return "feature-extraction"
    raise UnsupportedModelError(
        f"architecture {architecture!r} is not supported; expected a *ForCausalLM or a base "
        "*Model (encoder) class"
    )


def read_architecture(folder: Path) -> str:
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise UnsupportedModelError(
            f"config.json must name exactly one architecture, found {architectures!r}"
        )
    return architectures[0]


def load_tokenizer(folder: Path, task: str):
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    # Batched evaluation pads; a causal LM without a pad token pads with EOS (masked out anyway).
    if task == "causal-lm" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    folder: Path,
    *,
    device: torch.device | str | None = None,
    streamed: bool = False,
    scratch: Path | None = None,
) -> LoadedModel:
    """A float32 model in eval mode on `device` (default: `select_device()`), with its tokenizer.

    `streamed`: only the parts outside the repeated blocks are loaded; the blocks stay in the
    checkpoint's files and are materialised one at a time (`streaming.py`; their changed tensors
    go to `scratch`, default a temporary folder), so a model larger than memory can be compressed.
    """
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise UnsupportedModelError(f"{folder.name} has no .safetensors weights")
    architecture = read_architecture(folder)
    task = task_of(architecture)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    device = torch.device(device or select_device())
    if streamed:
        model = build_streamed(model_class, config, folder, device=device, scratch=scratch)
    else:
        model = model_class.from_pretrained(
            folder,
            config=config,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
        model.to(device).eval()
    dtype = checkpoint_dtype(folder)
    setattr(model, DTYPE_ATTRIBUTE, dtype)
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(folder, task),
        task=task,
        architecture=architecture,
        folder=folder,
        dtype=dtype,
    )


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and the folder entries themselves to disk."""
    for path in sorted(folder.rglob("*")) + [folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def publish_folder(temporary: Path, target: Path) -> Path:
    """Make a fully written temp folder appear at `target` in one rename, so a reader (or a crash)
    never sees half a folder. `target` must not exist, or be an empty folder."""
    fsync_tree(temporary)
    os.rename(temporary, target)  # fails on a non-empty target instead of mixing two folders
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def convert_gguf(gguf_path: Path, out_folder: Path) -> Path:
    """Convert a GGUF file (e.g. SmolLM2's) into a standard float32 safetensors HF folder.

    transformers de-quantizes the GGUF tensors while loading (`gguf_file=`); the result is saved
    with `save_pretrained`, whose bytes depend only on the input and library versions. The folder
    is written next to `out_folder` and renamed into place when complete.
    """
    gguf_path, out_folder = Path(gguf_path), Path(out_folder)
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(
        tempfile.mkdtemp(prefix=f".{out_folder.name}.", suffix=".partial", dir=out_folder.parent)
    )
    try:
        source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        except (ValueError, KeyError) as error:
            raise UnsupportedModelError(f"cannot convert {gguf_path.name}: {error}") from error
        tokenizer = AutoTokenizer.from_pretrained(**source)
        # The weights are plain float32 tensors now; drop the "quantized with gguf" marker that
        # would otherwise make save_pretrained refuse and loaders look for the GGUF file.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        del model.config.quantization_config
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        return publish_folder(temporary, out_folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
