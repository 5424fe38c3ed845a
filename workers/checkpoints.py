"""Block checkpoints in storage, so a calibration stage killed half-way resumes from its last
finished block (`workers.compression.calibration.BlockCheckpoint`, implemented over the Store).

Layout under `checkpoints/<fingerprint>/` (one fingerprint per stage):
    block-<k>.safetensors     the state of finished block k
    hidden-<n>.safetensors    the inputs of block n (only the newest is kept)
    manifest.json             {"next_block": n, "summaries": {...}} -- written last: a checkpoint
                              exists once its manifest names files that are all in place.
A training stage (distill) keeps its state the same way:
    training-<step>.safetensors   weights and optimizer moments after `step` (only the newest kept)
    training.json                 {"step": n, ...} -- written last
The fingerprint covers the model bytes, the calibration data and settings, the recipe up to this
stage and the library versions, so a checkpoint is only ever reused for the same computation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app.storage import Store
from workers.compression.calibration import SavedProgress


def fingerprint(
    *,
    model: dict[str, Any],
    calibration: dict[str, Any] | None,
    stages: list[dict[str, Any]],
    versions: dict[str, str],
) -> str:
    body = json.dumps(
        {"model": model, "calibration": calibration, "stages": stages, "versions": versions},
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class StorageBlockCheckpoint:
    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def load(self) -> SavedProgress | None:
        if not self.store.exists(self._key("manifest.json")):
            return None
        with self.store.open(self._key("manifest.json")) as handle:
            manifest = json.load(handle)
        next_block = manifest["next_block"]
        states = {}
        for index in range(next_block):
            with self.store.open(self._key(f"block-{index}.safetensors")) as handle:
                states[index] = load_tensors(handle.read())
        with self.store.open(self._key(f"hidden-{next_block}.safetensors")) as handle:
            hidden = load_tensors(handle.read())
        return SavedProgress(
            next_block=next_block,
            block_states=states,
            summaries={int(k): v for k, v in manifest["summaries"].items()},
            hidden=[hidden[f"chunk-{i}"] for i in range(len(hidden))],
        )

    def save(self, *, next_block: int, block_state: dict, summary: dict, hidden: list) -> None:
        previous = self._manifest()
        summaries = {**previous.get("summaries", {}), str(next_block - 1): summary}
        self.store.put_bytes(
            self._key(f"block-{next_block - 1}.safetensors"), save_tensors(_plain(block_state))
        )
        self.store.put_bytes(
            self._key(f"hidden-{next_block}.safetensors"),
            save_tensors({f"chunk-{i}": h for i, h in enumerate(hidden)}),
        )
        manifest = {"next_block": next_block, "summaries": summaries}
        self.store.put_bytes(
            self._key("manifest.json"), json.dumps(manifest, sort_keys=True, default=str).encode()
        )
        if previous:
            self.store.delete(self._key(f"hidden-{previous['next_block']}.safetensors"))

    def _manifest(self) -> dict:
        if not self.store.exists(self._key("manifest.json")):
            return {}
        with self.store.open(self._key("manifest.json")) as handle:
            return json.load(handle)

    def load_training(self) -> tuple[dict, dict] | None:
        if not self.store.exists(self._key("training.json")):
            return None
        with self.store.open(self._key("training.json")) as handle:
            meta = json.load(handle)
        with self.store.open(self._key(f"training-{meta['step']}.safetensors")) as handle:
            return load_tensors(handle.read()), meta

    def save_training(self, tensors: dict, meta: dict) -> None:
        previous = None
        if self.store.exists(self._key("training.json")):
            with self.store.open(self._key("training.json")) as handle:
                previous = json.load(handle)["step"]
        self.store.put_bytes(
            self._key(f"training-{meta['step']}.safetensors"), save_tensors(_plain(tensors))
        )
        self.store.put_bytes(
            self._key("training.json"), json.dumps(meta, sort_keys=True, default=str).encode()
        )
        if previous is not None and previous != meta["step"]:
            self.store.delete(self._key(f"training-{previous}.safetensors"))

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix)


def _plain(state: dict) -> dict:
    """safetensors refuses shared or non-contiguous storage: give it private, contiguous copies."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
