"""What each method's artifact says about itself: parameters, bits per weight, size and quality,
measured on the exported folder (the numbers a job reports, the model card shows and the dashboard
charts), every method with its defaults on the MiniLM built-in.

    nice -n 10 .venv/bin/python -m bench.artifact_numbers

Writes bench/results/artifact_numbers.{json,md}. Calibration 32 x 128 tokens (the methods that
take it), evaluation: the mean embedding cosine to the original over 64 lee sentences at 128 tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench import results_file
from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.evaluation import Evaluator
from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
from workers.compression.export import save_model
from workers.compression.loading import load_model
from workers.compression.recipe import EvaluationSettings, Recipe

RECIPES = {
    "float32 (original)": None,
    "dynamic_int8": [{"method": "dynamic_int8"}],
    "rtn": [{"method": "rtn"}],
    "gptq": [{"method": "gptq"}],
    "awq": [{"method": "awq"}],
    "w8a8": [{"method": "w8a8"}],
    "smoothquant + w8a8": [{"method": "smoothquant"}, {"method": "w8a8"}],
    "fp8": [{"method": "fp8"}],
    "magnitude": [{"method": "magnitude"}],
    "wanda": [{"method": "wanda"}],
    "sparsegpt": [{"method": "sparsegpt"}],
    "structured, 25% of FFN channels": [{"method": "structured", "ffn_channels": 0.25}],
}
SETTINGS = EvaluationSettings(metrics=["size", "embedding_cosine"], seq_len=128, max_samples=64)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folder = builtin_model_folder("all-MiniLM-L6-v2", work / "cache")
        texts = [json.loads(line) for line in builtin_dataset_jsonl("lee-sentences").splitlines()]
        rows = []
        for name, stages in RECIPES.items():
            loaded = load_model(folder, device="cpu")
            calibration = calibration_batches(
                [r["text"] for r in texts], loaded.tokenizer, num_samples=32, seq_len=128, seed=0
            )
            evaluator = Evaluator.for_model(loaded, settings=SETTINGS, records=texts, device="cpu")
            started = time.perf_counter()
            model, out = loaded.model, None
            if stages is not None:
                torch.manual_seed(0)
                original = load_model(folder, device="cpu").model
                evaluator.measure(original, folder=None)  # the reference embeddings
                model = compress(
                    model, Recipe.model_validate({"stages": stages}), calibration
                ).model
                out = work / name.replace(" ", "_")
                save_model(loaded, model, out, recipe={"stages": stages}, metrics={}, inputs={})
            measured = evaluator.measure(model, folder=out)
            rows.append(
                {
                    "method": name,
                    "recipe": stages,
                    "parameters": measured.get("parameters"),
                    "bits_per_weight": measured.get("bits_per_weight"),
                    "size_bytes": measured.get("size_bytes"),
                    "size_source": measured.get("size_source"),
                    "embedding_cosine": measured.get("embedding_cosine"),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(rows[-1], flush=True)
    header = ["method", "parameters", "bits/weight", "size MB", "size from", "cosine", "s"]
    table = results_file.table(
        header,
        (
            [r["method"], f"{r['parameters']:,}", f"{r['bits_per_weight']:.2f}"]
            + [f"{r['size_bytes'] / 1e6:.1f}", r["size_source"]]
            + [f"{r['embedding_cosine']:.4f}" if r["embedding_cosine"] is not None else "-"]
            + [r["seconds"]]
            for r in rows
        ),
    )
    command = "nice -n 10 .venv/bin/python -m bench.artifact_numbers"
    results_file.write(
        "artifact_numbers",
        {"machine": results_file.machine(), "command": command, "results": rows},
        "# Every method's artifact, as its job reports it (MiniLM, defaults)\n\n"
        f"`{command}`. Parameters are the float model's logical weights whatever the layout packs "
        "them into; bits/weight counts every stored bit of the Linear weights (values, scales, "
        "zero points, masks); size is the weight files. Cosine: mean embedding cosine to the "
        "original, 64 lee sentences × 128 tokens.\n\n" + table,
    )
    print(table)


if __name__ == "__main__":
    main()
