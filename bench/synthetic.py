"""Random Llama-architecture models with the shapes of real ones, for memory and time scaling.

Quality is never measured on these (their weights are noise); the built-ins are the quality
references. The weights are written as bfloat16 safetensors shards the way checkpoints on a hub
are, and written streaming: each tensor is generated in row chunks from its own seeded generator
and appended to the shard file, so writing a 7B model needs a few MB of memory, not 13.5 GB.
The header of each shard is computed from the shapes before any data is written (the safetensors
layout: 8-byte little-endian header length, JSON header with each tensor's byte range, data).

    .venv/bin/python -m bench.synthetic llama-1b /tmp/llama-1b     # ~2.5 GB, ~1 min
    .venv/bin/python -m bench.synthetic llama-7b /tmp/llama-7b     # ~13.5 GB

The tokenizer is SmolLM2's (a real Llama BPE, 49,152 tokens): its ids are all valid rows of the
larger embedding, so jobs can tokenize real text for these models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SHARD_BYTES = 2 * 1024**3  # at most 2 GiB of tensor data per shard, as hubs shard checkpoints
ROWS_PER_CHUNK_BYTES = 32 * 1024**2  # generate ~32 MB at a time


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool

    @property
    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        block = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * block + self.hidden + head


SHAPES = {
    # Llama-3.2-1B: 1.24B parameters, tied embeddings.
    "llama-1b": Shape(2048, 16, 8192, 32, 8, 128256, tie_embeddings=True),
    # Llama-2-7B's blocks (hidden 4096, 32 layers, FFN 11008, 32 heads) with SmolLM2's 49,152-token
    # vocabulary instead of 32,000, so its tokenizer's ids are valid: 6.87B parameters.
    "llama-7b": Shape(4096, 32, 11008, 32, 32, 49152, tie_embeddings=False),
    # A few-block model of the 1B's width, for quick checks of the scaling code itself.
    "llama-1b-4layers": Shape(2048, 4, 8192, 32, 8, 128256, tie_embeddings=True),
    # The 7B's blocks and embeddings, 4 of its 32 blocks: a method's peak memory at the 7B's width
    # (it does not grow with depth: llama-1b-4layers against llama-1b) when all 32 take hours.
    "llama-7b-4layers": Shape(4096, 4, 11008, 32, 32, 49152, tie_embeddings=False),
}


def config_for(shape: Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": shape.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the order transformers writes them."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (shape.vocab, shape.hidden))
    ]
    for index in range(shape.layers):
        p = f"model.layers.{index}."
        tensors += [
            (p + "input_layernorm.weight", (shape.hidden,)),
            (p + "self_attn.q_proj.weight", (shape.hidden, shape.hidden)),
            (p + "self_attn.k_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.v_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.o_proj.weight", (shape.hidden, shape.hidden)),
            (p + "post_attention_layernorm.weight", (shape.hidden,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.up_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.down_proj.weight", (shape.hidden, shape.intermediate)),
        ]
    tensors.append(("model.norm.weight", (shape.hidden,)))
    if not shape.tie_embeddings:
        tensors.append(("lm_head.weight", (shape.vocab, shape.hidden)))
    return tensors


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def _shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _write_tensor(stream, name: str, dims: tuple[int, ...], seed: int) -> None:
    """Norm weights are ones (as initialised); matrices N(0, 0.02), row chunk by row chunk."""
    if len(dims) == 1:
        stream.write(torch.ones(dims, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    rows, cols = dims
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, ROWS_PER_CHUNK_BYTES // (4 * cols))
    for start in range(0, rows, chunk):
        block = torch.randn(min(chunk, rows - start), cols, generator=generator) * 0.02
        # bfloat16 has no numpy dtype: write its bits as int16.
        stream.write(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def write_model(folder: Path, shape: Shape, *, tokenizer_from: Path | None = None, seed: int = 0):
    """Write the model to `folder` (which must not exist); returns the folder. It is written
    next to it and renamed into place, so an interrupted write leaves no half model there."""
    target = Path(folder)
    folder = target.with_name(f".{target.name}.partial")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards = _shards(tensor_shapes(shape))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    tensor_index = 0
    for filename, shard in zip(names, shards, strict=True):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in shard:
            nbytes = 2 * _numel(dims)
            header[name] = {
                "dtype": "BF16",
                "shape": list(dims),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = filename
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        with open(folder / filename, "wb") as stream:
            stream.write(struct.pack("<Q", len(encoded)))
            stream.write(encoded)
            for name, dims in shard:
                _write_tensor(stream, name, dims, seed * 100003 + tensor_index)
                tensor_index += 1
    total = sum(2 * _numel(dims) for _, dims in tensor_shapes(shape))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True)
    )
    (folder / "config.json").write_text(json.dumps(config_for(shape), indent=2, sort_keys=True))
    if tokenizer_from is not None:
        for path in Path(tokenizer_from).iterdir():
            if path.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(path, folder / path.name)
    folder.rename(target)
    return target


def smollm2_tokenizer_folder(cache_dir: Path) -> Path:
    from workers.compression.examples import builtin_model_folder

    return builtin_model_folder("SmolLM2-135M-Instruct", cache_dir)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path(".slimformer/cache"))
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    write_model(
        args.folder, shape, tokenizer_from=smollm2_tokenizer_folder(args.cache_dir), seed=args.seed
    )
    print(f"{args.shape}: {shape.parameters / 1e9:.2f}B parameters in {args.folder}")


if __name__ == "__main__":
    main()
