"""What the baseline cache's key (workers/baseline_cache.py) depends on, and what it does not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from workers.baseline_cache import baseline_inputs, without_latency
from workers.compression.recipe import EvaluationSettings
from workers.result_cache import fingerprint


def key(*, metrics=("embedding_cosine", "latency", "size"), device="cpu", sha="a" * 64, **settings):
    evaluator = SimpleNamespace(
        task="feature-extraction",
        metrics=list(metrics),
        settings=EvaluationSettings(metrics=list(metrics), **settings),
    )
    return fingerprint(
        baseline_inputs(
            model_sha256="m" * 64,
            evaluator=evaluator,
            dataset_sha256=sha,
            device_class=device,
            streamed=False,
        )
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"max_samples": 33},
        {"seq_len": 64},
        {"device": "gpu"},
        {"sha": "b" * 64},
        {"metrics": ("embedding_cosine",)},
    ],  # fmt: skip
)
def test_what_the_numbers_depend_on_changes_the_key(changed):
    assert key(**changed) != key()


def test_latency_is_measured_anyway_so_it_does_not():
    assert key(latency={"runs": 5}) == key()
    assert key(metrics=("size", "embedding_cosine")) == key()


def test_latency_is_never_cached():
    measured = {"size_bytes": 1, "latency_ms_p50": 2.0, "latency_noisy": False,
                "tokens_per_s": 3.0, "peak_memory_bytes": 4, "embedding_cosine": 1.0}  # fmt: skip
    assert without_latency(measured) == {"size_bytes": 1, "embedding_cosine": 1.0}
