"""The evaluation harness on tiny models: baseline first, then the same passes on the result."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from workers.compression import compress
from workers.compression.evaluation import NOISY_SPREAD, Evaluator, latency_summary
from workers.compression.export import save_model
from workers.compression.recipe import (
    DynamicInt8Config,
    EvaluationSettings,
    LatencySettings,
    Recipe,
)

FAST_LATENCY = LatencySettings(batch_size=2, seq_len=16, runs=3, warmup=1)


def evaluator(loaded, records, **settings) -> Evaluator:
    return Evaluator.for_model(
        loaded,
        settings=EvaluationSettings(latency=FAST_LATENCY, **settings),
        records=records,
        device="cpu",
    )


def test_baseline_then_compressed_on_a_causal_lm(llama, records, tmp_path):
    harness = evaluator(
        llama,
        records,
        seq_len=32,
        max_windows=3,
        metrics=["perplexity", "embedding_cosine", "latency", "size"],
    )
    baseline = harness.measure(llama.model, folder=None)
    assert baseline["embedding_cosine"] == pytest.approx(1.0)
    # A random model over a 128-token vocabulary is about uniform.
    assert 50 < baseline["perplexity"] < 400
    assert baseline["latency_ms_p95"] >= baseline["latency_ms_p90"] >= baseline["latency_ms_p50"]
    assert baseline["latency_ms_p50"] >= baseline["latency_ms_p10"] > 0
    assert baseline["latency_runs"] == FAST_LATENCY.runs
    assert baseline["latency_noisy"] is (baseline["latency_spread"] > NOISY_SPREAD)
    assert baseline["tokens_per_s"] > 0 and baseline["peak_memory_bytes"] > 0
    assert baseline["size_source"] == "in-memory tensors"
    assert baseline["bits_per_weight"] == pytest.approx(32, rel=1e-6)

    compress(llama.model, Recipe(stages=[DynamicInt8Config()]))
    save_model(llama, llama.model, tmp_path / "int8", recipe={}, metrics={}, inputs={})
    compressed = harness.measure(llama.model, folder=tmp_path / "int8")
    assert 0.9 < compressed["embedding_cosine"] < 1.0
    assert compressed["embedding_cosine_min"] <= compressed["embedding_cosine"]
    assert compressed["parameters"] == baseline["parameters"]
    assert compressed["size_source"] == "weight files"
    assert compressed["size_bytes"] == (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert compressed["bits_per_weight"] < 32

    delta = Evaluator.delta(baseline, compressed)
    assert delta["perplexity"]["difference"] == pytest.approx(
        compressed["perplexity"] - baseline["perplexity"]
    )
    assert delta["parameters"] == {"difference": 0, "ratio": 1.0}
    assert "size_source" not in delta


def test_latency_reports_its_spread_and_flags_a_noisy_measurement():
    steady = latency_summary([0.010 + 0.0001 * i for i in range(20)])
    assert steady["latency_ms_p50"] == pytest.approx(10.9)  # nearest rank: the 10th of 20
    assert steady["latency_ms_p10"] == pytest.approx(10.1)
    assert steady["latency_ms_p90"] == pytest.approx(11.7)
    assert steady["latency_runs"] == 20
    assert steady["latency_spread"] == pytest.approx(1.6 / 10.9)
    assert steady["latency_noisy"] is False and "latency_warning" not in steady

    # Two identical jobs measured 38 ms and 582 ms: a busy machine. The spread says so.
    busy = latency_summary([0.038] * 10 + [0.582] * 10)
    assert busy["latency_noisy"] is True
    assert busy["latency_ms_p10"] == pytest.approx(38) and busy["latency_ms_p90"] == pytest.approx(
        582
    )
    assert "busy" in busy["latency_warning"] and "20 runs" in busy["latency_warning"]
    assert latency_summary([0.02, 0.01, 0.03]) == latency_summary([0.01, 0.02, 0.03])


def test_perplexity_is_the_token_weighted_nll_of_strided_windows(llama, records):
    harness = evaluator(
        llama, records, seq_len=24, stride=16, max_windows=4, metrics=["perplexity"]
    )
    settings = harness.settings_record()["perplexity"]
    assert settings == {
        "seq_len": 24,
        "stride": 16,
        "max_windows": 4,
        "windows": 4,
        "scored_tokens": 23 + 3 * 16,
    }
    # Recompute by hand: each window scores only the tokens past the previous window's end.
    stream = [ids for ids in harness.tokenizer(" ".join(r["text"] for r in records))["input_ids"]]
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin, first_scored in ((0, 1), (16, 24), (32, 40), (48, 56)):
            ids = torch.tensor([stream[begin : begin + 24]])
            logits = llama.model(input_ids=ids).logits[0]
            for position in range(first_scored - begin, 24):
                total -= F.log_softmax(logits[position - 1], -1)[ids[0, position]].item()
                count += 1
    assert count == settings["scored_tokens"]
    ppl = harness.measure(llama.model, folder=None)["perplexity"]
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_settings_record_says_how_numbers_were_made(bert, records):
    harness = evaluator(bert, records, seq_len=32, max_samples=10)
    record = harness.settings_record()
    assert record["metrics"] == ["embedding_cosine", "latency", "size"]  # the encoder defaults
    assert record["num_texts"] == len(records) and record["device"] == "cpu"
    assert record["embedding"]["texts"] == 10 and record["embedding"]["max_len"] == 32
    assert record["latency"]["batch_size"] == 2 and record["latency"]["seq_len"] == 16
    assert record["torch_version"] == torch.__version__ and record["perplexity"] is None


def test_metrics_that_do_not_fit_the_task_are_refused(bert, records):
    with pytest.raises(ValueError, match="perplexity needs a causal"):
        evaluator(bert, records, metrics=["perplexity"])
    with pytest.raises(ValueError, match="no text"):
        evaluator(bert, [{"text": "  "}])


def test_a_model_on_another_device_is_refused(bert, records):
    harness = Evaluator(
        task=bert.task,
        tokenizer=bert.tokenizer,
        records=records,
        settings=EvaluationSettings(metrics=["size"]),
        device="meta",
    )
    with pytest.raises(ValueError, match="same device"):
        harness.measure(bert.model, folder=None)


def test_a_measurement_reports_every_pass_whole_and_streamed(records, tmp_path):
    from tests.engine.conftest import tiny_llama
    from workers.compression.loading import load_model

    whole = tiny_llama(layers=3)
    whole.model.save_pretrained(tmp_path / "model")
    whole.tokenizer.save_pretrained(tmp_path / "model")
    streamed = load_model(tmp_path / "model", device="cpu", streamed=True, scratch=tmp_path / "b")
    settings = {"seq_len": 32, "max_windows": 3, "metrics": ["perplexity", "latency"]}
    numbers = {}
    for name, loaded in (("whole", whole), ("streamed", streamed)):
        seen = []
        harness = evaluator(loaded, records, **settings)
        numbers[name] = harness.measure(
            loaded.model, folder=None, on_progress=lambda *step, into=seen: into.append(step)
        )
        assert [done for done, _, _ in seen] == list(range(1, len(seen) + 1))
        assert {total for _, total, _ in seen} == {len(seen)}
        details = [detail for _, _, detail in seen]
        if name == "whole":  # 3 windows, 1 warm-up, 3 timed runs, the memory pass
            assert details == [
                "window 1/3", "window 2/3", "window 3/3", "latency warm-up 1/1",
                "latency run 1/3", "latency run 2/3", "latency run 3/3", "peak memory",
            ]  # fmt: skip
        else:  # the windows go through one block at a time; no latency for a streamed model
            assert details == ["block 1/3 of 3 windows", "block 2/3 of 3 windows",
                               "block 3/3 of 3 windows"]  # fmt: skip
    assert numbers["streamed"]["perplexity"] == pytest.approx(numbers["whole"]["perplexity"])


def test_a_cached_baseline_state_gives_the_same_comparisons(llama, records):
    metrics = ["embedding_cosine", "accuracy"]
    labelled = [{**r, "label": "ab"[i % 2]} for i, r in enumerate(records * 4)]
    first = evaluator(llama, labelled, metrics=metrics, max_samples=16, seq_len=32)
    first.measure(llama.model, folder=None)
    compress(llama.model, Recipe(stages=[DynamicInt8Config()]))
    expected = first.measure(llama.model, folder=None)
    assert expected["embedding_cosine"] < 1.0
    # A later job's evaluator never saw the original model: it takes the state instead.
    later = evaluator(llama, labelled, metrics=metrics, max_samples=16, seq_len=32)
    later.restore_baseline_state(first.baseline_state())
    assert later.measure(llama.model, folder=None) == expected
