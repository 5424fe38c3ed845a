"""One row of `bench/quant_peers.py`, in a fresh process so its peak RSS is its own.

    python -m bench.peers.worker SPEC.json RESULT.json      (run by bench/quant_peers.py)
    python -m bench.peers.worker --versions                 (this venv's library versions)

The row's process loads the float32 model, compresses it (timed; VmHWM read right after, so the
peak covers loading plus compressing and nothing that follows), saves the result and loads it
back as the library documents, then measures it with Slimformer's `Evaluator` built from the same
records and settings in every row. Latency is measured against a float32 copy loaded in the same
process afterwards, alternating the two models run by run, and reported as median ratios.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from bench.peers.compressors import Unavailable, build, targets_of, weight_zero_fraction
from workers.compression.data import token_stream
from workers.compression.evaluation import Evaluator
from workers.compression.loading import load_model
from workers.compression.recipe import EvaluationSettings

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "compressed-tensors",
    "accelerate",
    "numpy",
    "pydantic",
    "llmcompressor",
    "torchao",
    "datasets",
    "slimformer",
)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def latency_ids(stream: list[int], batch: int, seq_len: int) -> torch.Tensor:
    """The Evaluator's latency input: the evaluation token stream, cycled if too short."""
    needed = batch * seq_len
    return torch.tensor((stream * (needed // len(stream) + 1))[:needed]).reshape(batch, seq_len)


@torch.inference_mode()
def interleaved_latency(
    reference: nn.Module,
    compressed: nn.Module,
    ids: torch.Tensor,
    *,
    task: str,
    runs: int,
    warmup: int,
) -> dict:
    """Median seconds of one full forward for each model, the two alternating run by run (in
    swapped order every other run), so a slow spell on this shared machine hits both alike."""
    kwargs = {"use_cache": False} if task == "causal-lm" else {}
    for model in (reference, compressed):
        for _ in range(warmup):
            model(input_ids=ids, **kwargs)
    timings: dict[str, list[float]] = {"fp32": [], "compressed": []}
    for run in range(runs):
        order = [("fp32", reference), ("compressed", compressed)]
        for name, model in order if run % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            model(input_ids=ids, **kwargs)
            timings[name].append(time.perf_counter() - started)
    fp32, compressed_s = (
        statistics.median(timings["fp32"]),
        statistics.median(timings["compressed"]),
    )
    return {
        "fp32_ms": fp32 * 1000,
        "compressed_ms": compressed_s * 1000,
        "ratio": compressed_s / fp32,
        "runs": runs,
        "warmup": warmup,
    }


def run(spec: dict) -> dict:
    compressor = build(spec["library"], spec["options"])
    compressor.check()  # skips before loading anything
    model_spec, evaluation = spec["model"], spec["evaluation"]
    torch.manual_seed(0)
    loaded = load_model(Path(model_spec["folder"]), device="cpu")
    ids = load_file(model_spec["calibration"])["input_ids"]
    calibration = [row.unsqueeze(0) for row in ids]
    targets = targets_of(loaded.model)
    rss_loaded = proc_status_bytes("VmRSS")

    started = time.perf_counter()
    summary = compressor.compress(loaded, calibration, targets)
    compress_s = time.perf_counter() - started
    peak_rss = proc_status_bytes("VmHWM")
    zeros = weight_zero_fraction(loaded.model, targets)

    work = Path(tempfile.mkdtemp(prefix="row-", dir=spec["work_dir"]))
    try:
        started = time.perf_counter()
        exported = compressor.export(loaded, work / "saved")
        export_s = time.perf_counter() - started
        size = sum(path.stat().st_size for path in exported.files) if exported.files else None
        if exported.model is not loaded.model:
            loaded.model = None  # one compressed copy in memory from here on
            gc.collect()

        settings = EvaluationSettings(
            metrics=[evaluation["metric"]],
            seq_len=evaluation["seq_len"],
            max_windows=evaluation["windows"],
            max_samples=evaluation["texts"],
        )
        records = read_records(Path(model_spec["evaluation_records"]))
        evaluator = Evaluator.for_model(loaded, settings=settings, records=records, device="cpu")
        reference = load_model(Path(model_spec["folder"]), device="cpu").model
        if evaluation["metric"] == "embedding_cosine":
            evaluator.measure(reference, folder=None)  # the first measurement is the baseline
        quality = evaluator.measure(exported.model, folder=None)

        stream = token_stream(evaluator.texts, loaded.tokenizer)
        latency = {
            f"{batch}x{seq_len}": interleaved_latency(
                reference,
                exported.model,
                latency_ids(stream, batch, seq_len),
                task=loaded.task,
                runs=spec["latency"]["runs"],
                warmup=spec["latency"]["warmup"],
            )
            for batch, seq_len in spec["latency"]["shapes"]
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    windows = hashlib.sha256()
    for window_ids, _ in evaluator.windows:
        windows.update(window_ids.numpy().tobytes())
    return {
        "quality": quality,
        "compress_s": compress_s,
        "peak_rss_bytes": peak_rss,
        "rss_after_load_bytes": rss_loaded,
        "process_peak_rss_bytes": proc_status_bytes("VmHWM"),
        "export_s": export_s,
        "size_bytes": size,
        "size_format": exported.format,
        "measured": exported.measured,
        "latency": latency,
        "targets": len(targets),
        "weight_zero_fraction": zeros,
        "summary": summary,
        "details": exported.details,
        "evaluation_settings": evaluator.settings_record(),
        "evaluation_windows_sha256": windows.hexdigest() if evaluator.windows else None,
        "calibration_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    if sys.argv[1:] == ["--versions"]:
        print(json.dumps(versions()))
        return
    spec_path, result_path = map(Path, sys.argv[1:3])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    result = {"versions": versions()}
    try:
        result.update(run(spec), status="ok")
    except Unavailable as reason:
        result.update(status="skipped", reason=str(reason))
    except Exception as error:  # noqa: BLE001  (a peer failing is a result, recorded honestly)
        result.update(
            status="failed",
            error=f"{type(error).__name__}: {error}"[:2000],
            traceback=traceback.format_exc()[-4000:],
        )
    result_path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
