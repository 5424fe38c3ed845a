"""Block checkpoints kept in the real local store: a run killed in block 1 resumes bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from app.storage import LocalStore
from tests.engine.test_quant import Killed, calibration, state
from workers.checkpoints import StorageBlockCheckpoint, fingerprint
from workers.compression.calibration import run_blockwise
from workers.compression.methods.gptq import GptqBlockHandler
from workers.compression.recipe import GptqConfig


def test_storage_checkpoint_resumes_bit_for_bit(make_llama, tmp_path: Path) -> None:  # noqa: ANN001
    config = GptqConfig(group_size=8)
    samples = calibration()

    def handler_for(model: nn.Module) -> GptqBlockHandler:
        return GptqBlockHandler(
            config, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
        )

    reference = make_llama().model
    run_blockwise(reference, samples, handler_for(reference), progress=lambda *u: None)

    store = LocalStore(tmp_path / "store")
    key = fingerprint(
        model={"sha256": "m"},
        calibration={"n": 8},
        stages=[config.model_dump()],
        versions={"torch": torch.__version__},
    )
    checkpoint = StorageBlockCheckpoint(store, f"checkpoints/{key}")
    killed = make_llama().model
    handler = handler_for(killed)

    def dies_in_block_1(index, name, block, inputs):  # noqa: ANN001, ANN202
        if index == 1:
            raise Killed
        return handler(index, name, block, inputs)

    with pytest.raises(Killed):
        run_blockwise(
            killed, samples, dies_in_block_1, progress=lambda *u: None, checkpoint=checkpoint
        )
    saved = sorted(p.name for p in (tmp_path / "store" / "checkpoints" / key).iterdir())
    assert saved == ["block-0.safetensors", "hidden-1.safetensors", "manifest.json"]

    resumed = make_llama().model  # what a new worker process starts from
    handler = handler_for(resumed)
    calls = []

    def counting(index, name, block, inputs):  # noqa: ANN001, ANN202
        calls.append(index)
        return handler(index, name, block, inputs)

    run_blockwise(
        resumed,
        samples,
        counting,
        progress=lambda *u: None,
        checkpoint=StorageBlockCheckpoint(store, f"checkpoints/{key}"),
    )
    assert calls == [1]
    expected, actual = state(reference), state(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    checkpoint.clear()
    assert not (tmp_path / "store" / "checkpoints" / key).exists()
