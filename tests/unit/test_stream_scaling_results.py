"""bench.stream_scaling's results: rows merged by key (calibration included), CPU time per phase,
and the compress-phase CPU seconds per billion parameters."""

from __future__ import annotations

import json
import threading

import pytest

from bench import stream_scaling


def _row(model: str, parameters: int, compress_cpu: float, calibration: dict | None) -> dict:
    phases = {
        name: {
            "seconds": 2.0,
            "cpu_seconds": compress_cpu if name == "compress" else 1.0,
            "peak_rss_bytes": 500_000_000,
            "peak_rss_anon_bytes": 400_000_000,
            "peak_rss_file_bytes": 100_000_000,
        }
        for name in stream_scaling.PHASES
    }
    return {
        "model": model,
        "method": "gptq",
        "streamed": True,
        "device": "cpu",
        "parameters": parameters,
        "checkpoint_bytes": 2 * parameters,
        "checkpoint_dtype": "bfloat16",
        "calibration": calibration,
        "phases": phases,
        "peak_rss_bytes": 500_000_000,
        "peak_rss_anon_bytes": 400_000_000,
        "wall_s": 8.0,
        "cpu_s": compress_cpu + 3.0,
        "artifact_bytes": parameters // 2,
        "load_average_start": [1.0, 1.0, 1.0],
        "load_average": [2.0, 1.0, 1.0],
        "commit": "abc1234",
    }


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_scaling, "RESULTS", tmp_path)
    return tmp_path


def test_rows_of_other_calibrations_are_kept_and_the_same_key_replaced(results):
    small = {"samples": 8, "seq_len": 128}
    large = {"samples": 64, "seq_len": 512}
    stream_scaling.merge_rows([_row("smollm2", 10**8, 50.0, large)], "first")
    stream_scaling.merge_rows([_row("smollm2", 10**8, 5.0, small)], "second")
    stream_scaling.merge_rows([_row("smollm2", 10**8, 6.0, small)], "third")

    rows = json.loads((results / "stream_scaling.json").read_text())["rows"]
    by_calibration = {
        (r["calibration"]["samples"]): r["phases"]["compress"]["cpu_seconds"] for r in rows
    }
    assert by_calibration == {64: 50.0, 8: 6.0}


def test_merges_side_by_side_lose_no_row(results):
    rows = [_row(f"model-{i}", 10**9, 1.0, None) for i in range(8)]
    threads = [
        threading.Thread(target=stream_scaling.merge_rows, args=([row], "parallel")) for row in rows
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = json.loads((results / "stream_scaling.json").read_text())["rows"]
    assert sorted(r["model"] for r in merged) == sorted(r["model"] for r in rows)


def test_cpu_seconds_per_billion_parameters(results):
    calibration = {"samples": 8, "seq_len": 128}
    stream_scaling.merge_rows(
        [
            _row("llama-1b", 1_240_000_000, 620.0, calibration),
            _row("smollm2", 135_000_000, 27.0, calibration),
        ],
        "cmd",
    )
    page = (results / "stream_scaling.md").read_text()
    table = page.split("## Compress-phase CPU seconds per billion parameters")[1]
    lines = [line for line in table.splitlines() if line.startswith("| gptq")]
    # Smallest first; 27 / 0.135 = 200 and 620 / 1.24 = 500 CPU s per billion parameters.
    assert [line.split(" | ")[2] for line in lines] == ["smollm2", "llama-1b"]
    assert [line.split(" | ")[7] for line in lines] == ["200", "500"]
    # Less the embeddings (128,256 x 2,048 tied; 49,152 x 576 tied) and the final norm.
    assert [line.split(" | ")[4] for line in lines] == ["0.107B", "0.977B"]
    # The main table gives the row's CPU seconds and their split per phase.
    assert "| 623 (1 / 620 / 1 / 1) |" in page


def test_cpu_seconds_count_this_process_work():
    before = stream_scaling._cpu_seconds()
    total = 0
    while stream_scaling._cpu_seconds() - before < 0.2:
        total += sum(range(10_000))
    assert stream_scaling._cpu_seconds() - before >= 0.2


def test_a_peer_row_is_compared_with_ours_on_the_same_calibration_ids(results):
    same = {"samples": 64, "seq_len": 512, "sha256": "aa"}
    ours = _row("smollm2", 135_000_000, 480.0, same)
    ours["phases"]["compress"]["peak_rss_bytes"] = 670_000_000
    ours["peak_rss_bytes"] = 700_000_000
    peer = _row("smollm2", 135_000_000, 4000.0, same) | {
        "method": "llmcompressor-gptq",
        "library": "llm-compressor",
        "library_version": "0.14.0.1",
        "streamed": False,
        "peak_rss_bytes": 1_900_000_000,
        "measured_at": "2026-12-07T16:00:00+00:00",
    }
    peer["phases"]["compress"]["peak_rss_bytes"] = 1_340_000_000
    ours["measured_at"] = "2026-12-07T15:00:00+00:00"
    # Another calibration's row of ours is not its pair, even at the same settings.
    other = _row("smollm2", 135_000_000, 470.0, {"samples": 64, "seq_len": 512, "sha256": "bb"})
    other["streamed"] = False
    stream_scaling.merge_rows([ours, peer, other], "cmd")

    page = (results / "stream_scaling.md").read_text()
    table = page.split("## Against a peer library")[1]
    lines = [line for line in table.splitlines() if line.startswith("| smollm2")]
    assert len(lines) == 1
    # Load + compress: 670 / 1,340 MB; overall 700 / 1,900.
    assert "670 / 1,340 (**0.50×**)" in lines[0]
    assert "700 / 1,900 (0.37×)" in lines[0]
    assert "| 480 / 4000 |" in lines[0]


def test_without_a_peer_row_there_is_no_peer_table(results):
    stream_scaling.merge_rows([_row("smollm2", 135_000_000, 480.0, None)], "cmd")
    assert "## Against a peer library" not in (results / "stream_scaling.md").read_text()
