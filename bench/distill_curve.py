"""Distillation curves: quality against training time for the student sizes Slimformer makes,
undistilled vs distilled vs distilled-then-quantized, with latency and size as ratios to the
original measured in the same run. Writes bench/results/distill.{json,md}.

    .venv/bin/python -m bench.distill_curve                      # the CPU budget committed
    .venv/bin/python -m bench.distill_curve --models smollm2 --steps 2000 --batch-size 16 \\
        --seq-len 512 --device cuda                              # a real budget on a GPU

Students: SmolLM2-135M (30 blocks) keeping 20 or 15 blocks, or with 25% / 50% of its FFN channels
removed (`structured`, activation criterion); MiniLM (6 blocks) keeping 4, 3 or 2. Each is trained
with the `distill` stage (KL on logits at T=2 + relative hidden-state MSE; MiniLM: 1 - cosine of
pooled embeddings + hidden MSE) on the built-in training text (SmolLM2: enwiki-calibration;
MiniLM: lee-sentences, its last 256 sentences held out for the evaluation), then quantized
(SmolLM2: `w8a8` dynamic, MiniLM: `dynamic_int8`), saved with `export.save_model` and loaded back
with `export.load_artifact` -- what a user runs.

Quality: SmolLM2 perplexity on enwiki-evaluation; MiniLM mean embedding cosine to the original.
The curve against time is the stage's held-out evaluations (step, training seconds, held-out
perplexity or cosine). Latency: one forward at batch 1 x 128 tokens, the original and every
variant interleaved run by run, medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

from bench.structured_curve import folder_bytes, latency_ratios

RESULTS = Path(__file__).parent / "results"
STUDENTS = {
    "smollm2": [
        ("20 blocks", {"num_layers": 20}),
        ("15 blocks", {"num_layers": 15}),
        ("FFN -25%", {"ffn_channels": 0.25}),
        ("FFN -50%", {"ffn_channels": 0.5}),
    ],
    "minilm": [
        ("4 blocks", {"num_layers": 4}),
        ("3 blocks", {"num_layers": 3}),
        ("2 blocks", {"num_layers": 2}),
    ],
}
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}


def texts(name: str) -> list[str]:
    from workers.compression.examples import builtin_dataset_jsonl

    return [json.loads(line)["text"] for line in builtin_dataset_jsonl(name).splitlines()]


def run_model(key: str, args: argparse.Namespace, cache: Path) -> dict:
    import torch

    from workers.compression import compress
    from workers.compression.data import calibration_batches
    from workers.compression.evaluation import Evaluator, parameter_count
    from workers.compression.examples import builtin_model_folder
    from workers.compression.export import load_artifact, save_model
    from workers.compression.loading import load_model
    from workers.compression.methods.distill import evenly_spaced, keep_blocks
    from workers.compression.recipe import EvaluationSettings, Recipe
    from workers.compression.registry import StageResources

    device = torch.device(args.device)
    folder = builtin_model_folder(NAMES[key], cache)
    original = load_model(folder, device=device)
    causal = original.task == "causal-lm"
    if causal:
        training = texts("enwiki-calibration")
        held = texts("enwiki-evaluation")
        settings = EvaluationSettings(
            metrics=["perplexity"], seq_len=args.eval_seq_len, max_windows=args.windows
        )
        quality = "perplexity"
        quantize = {"method": "w8a8", "activations": "dynamic"}
    else:
        sentences = texts("lee-sentences")
        training, held = sentences[:-256], sentences[-256:]
        settings = EvaluationSettings(metrics=["embedding_cosine"], seq_len=128, max_samples=256)
        quality = "embedding_cosine"
        quantize = {"method": "dynamic_int8"}
    harness = Evaluator(
        task=original.task,
        tokenizer=original.tokenizer,
        settings=settings,
        records=[{"text": text} for text in held],
        device=device,
    )
    base = harness.measure(original.model, folder=None)[quality]
    calibration = (
        calibration_batches(training, original.tokenizer, num_samples=16, seq_len=256, seed=0)
        if causal
        else None
    )
    resources = StageResources.from_texts(original.tokenizer, training)
    depth = original.model.config.num_hidden_layers
    steps = args.steps or (40 if causal else 150)
    batch = args.batch_size or (4 if causal else 16)
    seq_len = args.seq_len or (128 if causal else 64)
    lr = args.learning_rate or (2e-4 if causal else 5e-4)
    rows, timed = [], {"original": original.model}
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    for label, spec in STUDENTS[key]:
        if args.only and label not in args.only:
            continue
        print(f"[{key}] {label}", flush=True)
        distill = {
            "method": "distill",
            "steps": steps,
            "batch_size": batch,
            "seq_len": seq_len,
            "learning_rate": lr,
            "micro_batch_size": min(batch, args.micro_batch_size or batch),
        }
        measured: dict = {}
        model = copy.deepcopy(original.model)
        if "num_layers" in spec:
            undistilled = copy.deepcopy(original.model)
            keep_blocks(undistilled, evenly_spaced(depth, spec["num_layers"]))
            measured["undistilled"] = harness.measure(undistilled, folder=None)[quality]
            stages = [{**distill, "student": spec}]
        else:
            undistilled = None
            stages = [{"method": "structured", **spec}, distill]

        def after(index: int, m, measured=measured) -> dict:  # noqa: ANN001
            measured["undistilled"] = harness.measure(m, folder=None)[quality]
            return {}

        started = time.perf_counter()
        result = compress(
            model,
            Recipe.model_validate({"stages": stages}),
            calibration,
            resources=resources,
            after_stage=after,
        )
        wall = time.perf_counter() - started
        summary = result.stages[-1]
        distilled = result.model
        measured["distilled"] = harness.measure(distilled, folder=None)[quality]
        float_folder = work / f"{key}-{label}-float".replace(" ", "_")
        save_model(original, distilled, float_folder, recipe={}, metrics={}, inputs={})
        quantized = copy.deepcopy(distilled)
        compress(quantized, Recipe.model_validate({"stages": [quantize]}), calibration)
        int_folder = work / f"{key}-{label}-int8".replace(" ", "_")
        save_model(original, quantized, int_folder, recipe={}, metrics={}, inputs={})
        deployed = load_artifact(int_folder, device=device).model
        measured["distilled+int8"] = harness.measure(deployed, folder=None)[quality]
        timed[f"{label}"] = distilled
        timed[f"{label} int8"] = deployed
        rows.append(
            {
                "student": label,
                "spec": spec,
                "parameters": parameter_count(distilled),
                "original_parameters": parameter_count(original.model),
                "quality": measured,
                "distill_seconds": summary["seconds"],
                "pipeline_seconds": round(wall, 1),
                "tokens_per_s": summary["tokens_per_s"],
                "held_out_curve": summary["held_out"],
                "size_bytes": {
                    "float": folder_bytes(float_folder),
                    "int8": folder_bytes(int_folder),
                },
            }
        )
        del undistilled, quantized
    original_size = folder_bytes(folder)
    ids = torch.tensor([harness.latency_input[0, :128].tolist()], device=device)
    medians = latency_ratios(timed, {"1x128": ids}, {"1x128": args.latency_runs})["1x128"]
    for row in rows:
        row["latency_ratio"] = {
            "float": round(medians[row["student"]] / medians["original"], 3),
            "int8": round(medians[f"{row['student']} int8"] / medians["original"], 3),
        }
        row["size_ratio"] = {k: round(v / original_size, 3) for k, v in row["size_bytes"].items()}
    return {
        "model": NAMES[key],
        "quality_metric": quality,
        "original_quality": base,
        "original_size_bytes": original_size,
        "latency_ms_original_1x128": round(medians["original"], 2),
        "budget": {
            "steps": steps,
            "batch_size": batch,
            "seq_len": seq_len,
            "learning_rate": lr,
            "device": str(device),
        },
        "evaluation": harness.settings_record(),
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        "# Distillation: students against their teacher",
        "",
        f"Reproduce: `{results['command']}` (finished {results['finished_at']}, "
        f"{results['minutes']} min on {results['machine']}).",
        "",
    ]
    for run in results["models"]:
        budget = run["budget"]
        metric = run["quality_metric"]
        lines += [
            f"## {run['model']}",
            "",
            f"Budget per student: {budget['steps']} steps x {budget['batch_size']} x "
            f"{budget['seq_len']} tokens, learning rate {budget['learning_rate']}, "
            f"on {budget['device']}. Original {metric}: {run['original_quality']:.4f}; "
            f"latency 1x128 {run['latency_ms_original_1x128']} ms.",
            "",
            f"| student | parameters | {metric}: undistilled | distilled | distilled + int8 | "
            "distill s | latency x (float / int8) | size x (float / int8) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in run["rows"]:
            q = row["quality"]
            lines.append(
                f"| {row['student']} | {row['parameters'] / 1e6:.1f}M | {q['undistilled']:.4f} | "
                f"{q['distilled']:.4f} | {q['distilled+int8']:.4f} | {row['distill_seconds']:.0f} | "
                f"{row['latency_ratio']['float']:.2f} / {row['latency_ratio']['int8']:.2f} | "
                f"{row['size_ratio']['float']:.2f} / {row['size_ratio']['int8']:.2f} |"
            )
        lines += ["", "Held-out curve during training (step, seconds, held-out quality):", ""]
        for row in run["rows"]:
            key = "perplexity" if metric == "perplexity" else "cosine"
            points = ", ".join(
                f"{p['step']}: {p['seconds']:.0f}s {p[key]:.3f}" for p in row["held_out_curve"]
            )
            lines.append(f"- {row['student']}: {points}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--only", nargs="+", help="student labels, e.g. '3 blocks'")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimformer")
    args = parser.parse_args()
    started = time.time()
    runs = [run_model(key, args, args.cache_dir) for key in args.models]
    results = {
        "command": "python -m bench.distill_curve " + " ".join(sys.argv[1:]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "minutes": round((time.time() - started) / 60, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "models": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "distill.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
