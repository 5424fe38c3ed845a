"""Writing a checkpoint larger than memory as safetensors shards, part by part.

A safetensors file starts with a header naming every tensor's dtype, shape and byte range, so a
shard cannot be written before all its tensors are known. `ShardWriter` therefore writes each part
it is given (one block's tensors, say) to a small file of its own as soon as it comes, and
`finish` assembles the shards from those files by copying bytes: the headers are computed from the
parts' headers, the data is streamed through a small buffer. Memory: one part; disk: the parts and
the shards, briefly both.

Shards hold at most `max_shard_bytes` of tensor data (2 GiB, as hubs shard), are named as
transformers names them (`model-00001-of-00003.safetensors`) and listed in
`model.safetensors.index.json`; a model that fits one shard is one `model.safetensors`, as
`save_pretrained` writes it. Tensors keep the order they were added in (sorted within a part), so
the bytes depend only on what was written.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

MAX_SHARD_BYTES = 2 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
_COPY_BYTES = 16 * 1024**2


def read_header(path: Path) -> tuple[dict, int]:
    """(the safetensors header of `path`, where its data starts)."""
    with open(path, "rb") as stream:
        length = struct.unpack("<Q", stream.read(8))[0]
        header = json.loads(stream.read(length))
    return header, 8 + length


class ShardWriter:
    def __init__(self, folder: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._parts: list[Path] = []
        self._names: set[str] = set()

    def add(
        self, tensors: dict[str, torch.Tensor], *, narrow_to: torch.dtype | None = None
    ) -> None:
        """Write one part now; its tensors must be new names. `narrow_to`: float32 tensors whose
        values that dtype holds exactly (a float32 copy of bf16 weights) are written in it."""
        if not tensors:
            return
        repeated = self._names & set(tensors)
        if repeated:
            raise ValueError(f"tensors written twice: {sorted(repeated)[:5]}")
        self._names |= set(tensors)
        path = self.folder / f".part-{len(self._parts):05d}.safetensors"
        write_file(path, tensors, narrow_to=narrow_to)
        self._parts.append(path)

    def finish(self) -> list[Path]:
        """Assemble the shards (and the index when there is more than one); the files written."""
        entries = []  # (name, dtype, shape, part, start, end) in order
        for part in self._parts:
            header, data_start = read_header(part)
            for name in sorted(key for key in header if key != "__metadata__"):
                info = header[name]
                start, end = info["data_offsets"]
                entries.append(
                    (name, info["dtype"], info["shape"], part, data_start + start, end - start)
                )
        shards: list[list[tuple]] = [[]]
        size = 0
        for entry in entries:
            if shards[-1] and size + entry[5] > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry[5]
        count = len(shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        written = []
        weight_map = {}
        for filename, shard in zip(names, shards, strict=True):
            self._write_shard(self.folder / filename, shard)
            weight_map.update({entry[0]: filename for entry in shard})
            written.append(self.folder / filename)
        for part in self._parts:
            part.unlink()
        if count > 1:
            total = sum(entry[5] for entry in entries)
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX_FILE).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
            written.append(self.folder / INDEX_FILE)
        return written

    @staticmethod
    def _write_shard(path: Path, shard: list[tuple]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, _, _, length in shard:
            header[name] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + length],
            }
            offset += length
        with open(path, "wb") as out:
            _write_header(out, header)
            for _, _, _, part, start, length in shard:
                with open(part, "rb") as source:
                    source.seek(start)
                    remaining = length
                    while remaining:
                        chunk = source.read(min(_COPY_BYTES, remaining))
                        out.write(chunk)
                        remaining -= len(chunk)


def write_file(
    path: Path, tensors: dict[str, torch.Tensor], *, narrow_to: torch.dtype | None = None
) -> None:
    """One safetensors file, written piece by piece from the tensors (safetensors' own `save_file`
    first builds the whole file in memory). Tensors in name order; see `ShardWriter.add` for
    `narrow_to`."""
    ordered = sorted(tensors)
    dtypes = {
        key: narrow_to
        if narrow_to is not None and exact_in(tensors[key], narrow_to)
        else tensors[key].dtype
        for key in ordered
    }
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in ordered:
        length = tensors[key].numel() * dtypes[key].itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtypes[key]],
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + length],
        }
        offset += length
    with open(path, "wb") as out:
        _write_header(out, header)
        for key in ordered:
            for chunk in _row_chunks(tensors[key]):
                out.write(_bytes(chunk.to(dtypes[key])))
                _drop_if_mapped(chunk)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_header(out, header: dict) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    out.write(struct.pack("<Q", len(encoded)))
    out.write(encoded)


def _row_chunks(tensor: torch.Tensor):
    """The tensor (moved to CPU piece by piece) in pieces of about _COPY_BYTES, in storage order."""
    flat = tensor.detach().reshape(-1)
    step = max(1, _COPY_BYTES // max(1, tensor.element_size()))
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step].cpu().contiguous()


def _drop_if_mapped(chunk: torch.Tensor) -> None:
    """A piece of a memory-mapped checkpoint tensor, written and never changed, leaves the
    resident set (`process_memory.drop_file_pages`): writing a 0.5 GB embedding does not make
    it all resident. Anything else (heap memory, a tensor written in place) is left alone."""
    if chunk.device.type != "cpu" or chunk.numel() < _DROP_MIN_NUMEL:
        return
    try:
        if chunk._version != 0:
            return
    except RuntimeError:  # inference-mode tensor: no version counter
        return
    from workers.compression.process_memory import drop_file_pages

    drop_file_pages(chunk.data_ptr(), chunk.numel() * chunk.element_size())


_DROP_MIN_NUMEL = 1 << 20


def _bytes(chunk: torch.Tensor) -> bytes:
    # numpy has no bfloat16 or float8: write the bits through an integer view of the same width.
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if chunk.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.bool):
        chunk = chunk.view(views[chunk.element_size()])
    return chunk.numpy().tobytes()


def exact_in(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a float32 tensor's values are all exactly representable in `dtype` (checked piece
    by piece, so a large tensor costs no copy of itself)."""
    if tensor.dtype != torch.float32 or dtype == torch.float32:
        return False
    return all(
        torch.equal(chunk.to(dtype).to(torch.float32), chunk) for chunk in _row_chunks(tensor)
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: its index's shards, or its one file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))
