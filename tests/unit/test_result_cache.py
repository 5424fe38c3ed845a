"""The result cache's fingerprint: every input it names changes it, and nothing else does."""

from __future__ import annotations

import copy

import pytest

from workers.result_cache import ENGINE_SOURCES, WORKERS, engine_digest, fingerprint

INPUTS = {
    "model": {"id": "mdl_1", "sha256": "a" * 64},
    "recipe": {"stages": [{"method": "dynamic_int8", "per_channel": True}]},
    "calibration": None,
    "evaluation": {"dataset_id": "dset_1", "seq_len": 32, "max_samples": 8},
    "sha256": {"mdl_1": "a" * 64, "dset_1": "b" * 64},
    "targets": None,
    "export": {"formats": ["safetensors"]},
    "versions": {"torch": "2.13.0", "transformers": "5.24.0", "engine": "c" * 64},
    "device": "cpu",
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("model", "sha256"), "d" * 64),
        (("recipe", "stages"), [{"method": "dynamic_int8", "per_channel": False}]),
        (("evaluation", "seq_len"), 16),
        (("sha256", "dset_1"), "e" * 64),
        (("export", "formats"), []),
        (("versions", "torch"), "2.14.0"),
        (("versions", "engine"), "f" * 64),
        (("device",), "gpu"),
        (("calibration",), {"dataset_id": "dset_2", "num_samples": 8, "seq_len": 32, "seed": 0}),
        (("targets",), {"max_metric_drop": {"embedding_cosine": 0.01}}),
    ],
)
def test_any_input_changes_the_fingerprint(path: tuple[str, ...], value: object) -> None:
    changed = copy.deepcopy(INPUTS)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert fingerprint(changed) != fingerprint(INPUTS)


def test_the_fingerprint_does_not_depend_on_key_order() -> None:
    reordered = {key: INPUTS[key] for key in reversed(INPUTS)}
    reordered["evaluation"] = dict(reversed(list(INPUTS["evaluation"].items())))
    assert fingerprint(reordered) == fingerprint(INPUTS)


def test_the_engine_digest_covers_the_engines_source() -> None:
    assert all((WORKERS / entry).exists() for entry in ENGINE_SOURCES)
    assert engine_digest() == engine_digest()
    assert len(engine_digest()) == 64
