"""Structured pruning curve on SmolLM2-135M: FFN channels removed at 10-50% with the activation
criterion, and the same with Torch-Pruning's criteria for comparison. Writes
bench/results/structured.{json,md}.

    .venv/bin/python -m bench.structured_curve

For each fraction: perplexity on the built-in enwiki evaluation text (seq_len 256, 40 windows),
parameters, weight-file size (the folder `export.save_model` writes), and forward latency at
batch 1 x 128 and 32 x 128 tokens as a ratio to the unpruned model. Latency runs round-robin over
the original and every pruned model and reports medians, because this machine is shared and noisy.

Torch-Pruning (Fang et al. 2023, `torch-pruning` on PyPI) is compared when a Python that has it is
given; it runs in its own process and virtual environment and is never a project dependency:

    python -m venv /tmp/tpvenv
    /tmp/tpvenv/bin/pip install torch==2.13.0 torch-pruning transformers==5.24.0
    .venv/bin/python -m bench.structured_curve --torch-pruning /tmp/tpvenv/bin/python

There its dependency graph finds each layer's FFN channel group (gate_proj and up_proj rows,
down_proj columns), scores it with its group-magnitude (L2, no data) or group-Taylor (|w·∂L/∂w|
from language-model loss gradients on the same calibration tokens, the LLM-Pruner criterion)
importance, and prunes the same number of channels per layer; the folder it saves is loaded with
plain transformers and measured by the same harness. Its models have exactly our shapes, so their
latency is ours and is not measured again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
MODEL = "SmolLM2-135M-Instruct"


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def latency_ratios(models: dict, inputs: dict, runs: dict[str, int]) -> dict:
    """{batch name: {model name: median ms}} with the models interleaved run by run."""
    import torch

    timings = {batch: {name: [] for name in models} for batch in inputs}
    with torch.inference_mode():
        for batch, ids in inputs.items():
            for model in models.values():
                model(input_ids=ids, use_cache=False)  # warm-up
            for _ in range(runs[batch]):
                for name, model in models.items():
                    started = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    timings[batch][name].append(time.perf_counter() - started)
    return {
        batch: {name: 1000 * statistics.median(times) for name, times in by_model.items()}
        for batch, by_model in timings.items()
    }


def run_torch_pruning(
    python: str, model_folder: Path, calibration, fractions: list[float], work: Path
) -> dict:
    """Prune with Torch-Pruning in its own venv; {criterion: {fraction: folder}}."""
    import safetensors.torch
    import torch

    calibration_file = work / "calibration.safetensors"
    safetensors.torch.save_file({"input_ids": torch.cat(calibration)}, calibration_file)
    request = {
        "model": str(model_folder),
        "calibration": str(calibration_file),
        "out": str(work / "torch-pruning"),
        "fractions": fractions,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [python, __file__, "--torch-pruning-worker", json.dumps(request)], check=True, env=env
    )
    return {
        criterion: {f: work / "torch-pruning" / f"{criterion}-{f}" for f in fractions}
        for criterion in ("magnitude", "taylor")
    }


def torch_pruning_worker(request: dict) -> None:
    """Runs inside the Torch-Pruning venv: no Slimformer imports here."""
    import safetensors.torch
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    calibration = safetensors.torch.load_file(request["calibration"])["input_ids"]
    channels = model.config.intermediate_size

    def ffn_groups(model, idxs):  # noqa: ANN001, ANN202
        # RMSNorm weights are parameters outside Linear/Conv modules; their dim 0 is the hidden
        # size, which FFN pruning never touches.
        norms = [(m.weight, 0) for name, m in model.named_modules() if name.endswith("norm")]
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs={"input_ids": calibration[:1, :16], "use_cache": False},
                output_transform=lambda output: output.logits,
                unwrapped_parameters=norms,
                verbose=False,
            )
        return [
            graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=i)
            for layer, i in zip(model.model.layers, idxs, strict=True)
        ]

    every = [list(range(channels))] * len(model.model.layers)
    scores = {
        "magnitude": [
            tp.importance.GroupMagnitudeImportance(p=2)(g) for g in ffn_groups(model, every)
        ]
    }
    model.zero_grad()
    with torch.enable_grad():
        for chunk in calibration.split(4):
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            (loss * len(chunk) / len(calibration)).backward()
    scores["taylor"] = [tp.importance.GroupTaylorImportance()(g) for g in ffn_groups(model, every)]
    model.zero_grad(set_to_none=True)

    for criterion, per_layer in scores.items():
        for fraction in request["fractions"]:
            removed = round(fraction * channels)
            pruned = copy.deepcopy(model)
            lowest = [torch.argsort(s, stable=True)[:removed].tolist() for s in per_layer]
            for group in ffn_groups(pruned, lowest):
                group.prune()
            pruned.config.intermediate_size = channels - removed
            pruned.save_pretrained(Path(request["out"]) / f"{criterion}-{fraction}")
            print(f"torch-pruning {criterion} {fraction}: saved", flush=True)


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Every number of the curve; the saved models go under `work`."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.compression import compress
    from workers.compression.data import calibration_batches, token_stream
    from workers.compression.evaluation import Evaluator, parameter_count
    from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
    from workers.compression.export import save_model
    from workers.compression.loading import load_model
    from workers.compression.recipe import EvaluationSettings, Recipe, StructuredConfig

    def texts(name: str) -> list[str]:
        return [json.loads(line)["text"] for line in builtin_dataset_jsonl(name).splitlines()]

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = builtin_model_folder(MODEL, Path(args.cache_dir))
    loaded = load_model(folder, device="cpu")
    harness = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=EvaluationSettings(metrics=["perplexity"], seq_len=256, max_windows=args.windows),
        records=[{"text": text} for text in texts("enwiki-evaluation")],
        device="cpu",
    )
    calibration = calibration_batches(
        texts("enwiki-calibration"),
        loaded.tokenizer,
        num_samples=args.calibration_samples,
        seq_len=args.calibration_seq_len,
        seed=0,
    )
    # 32 x 128 consecutive tokens of the evaluation text: the b32 input; its first row is b1's.
    stream = token_stream(texts("enwiki-evaluation"), loaded.tokenizer)
    rows = torch.tensor(stream[: 32 * 128]).reshape(32, 128)
    latency_inputs = {"b1x128": rows[:1], "b32x128": rows}

    original = loaded.model
    save_model(loaded, original, work / "original", recipe={}, metrics={}, inputs={})
    rows_out = [
        {
            "method": "original",
            "ffn_channels": 0.0,
            "intermediate_size": original.config.intermediate_size,
            "perplexity": harness.measure(original, folder=None)["perplexity"],
            "parameters": parameter_count(original),
            "size_bytes": folder_bytes(work / "original"),
        }
    ]
    print(rows_out[-1], flush=True)
    pruned_models = {"original": original}
    for fraction in args.fractions:
        model = copy.deepcopy(original)
        started = time.perf_counter()
        stage = compress(
            model, Recipe(stages=[StructuredConfig(ffn_channels=fraction)]), calibration
        ).stages[0]
        seconds = time.perf_counter() - started
        save_model(loaded, model, work / f"activation-{fraction}", recipe={}, metrics={}, inputs={})
        rows_out.append(
            {
                "method": "slimformer activation",
                "ffn_channels": fraction,
                "intermediate_size": stage["ffn_channels"]["after"],
                "perplexity": harness.measure(model, folder=None)["perplexity"],
                "parameters": stage["parameters"]["after"],
                "size_bytes": folder_bytes(work / f"activation-{fraction}"),
                "prune_seconds": seconds,
            }
        )
        print(rows_out[-1], flush=True)
        pruned_models[f"activation-{fraction}"] = model

    runs = {"b1x128": args.b1_runs, "b32x128": args.b32_runs}
    latency_ms = latency_ratios(pruned_models, latency_inputs, runs)
    for row in rows_out:
        name = "original" if row["method"] == "original" else f"activation-{row['ffn_channels']}"
        for batch, by_model in latency_ms.items():
            row[f"latency_{batch}_ms"] = by_model[name]
            row[f"latency_{batch}_ratio"] = by_model[name] / by_model["original"]
    del pruned_models

    torch_pruning: dict = {"python": args.torch_pruning}
    if args.torch_pruning:
        started = time.perf_counter()
        folders = run_torch_pruning(args.torch_pruning, folder, calibration, args.fractions, work)
        torch_pruning["seconds"] = time.perf_counter() - started
        for criterion, by_fraction in folders.items():
            for fraction, saved in by_fraction.items():
                model = AutoModelForCausalLM.from_pretrained(saved).eval()
                rows_out.append(
                    {
                        "method": f"torch-pruning {criterion}",
                        "ffn_channels": fraction,
                        "intermediate_size": model.config.intermediate_size,
                        "perplexity": harness.measure(model, folder=None)["perplexity"],
                        "parameters": parameter_count(model),
                        "size_bytes": folder_bytes(saved),
                    }
                )
                print(rows_out[-1], flush=True)
                del model
        version = subprocess.run(
            [
                args.torch_pruning,
                "-c",
                "import importlib.metadata as m; print(m.version('torch-pruning'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        torch_pruning["version"] = version.stdout.strip()

    return {
        "model": MODEL,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "command": " ".join(["python -m bench.structured_curve", *sys.argv[1:]]),
        "settings": {
            "evaluation": harness.settings_record(),
            "calibration": {
                "dataset": "enwiki-calibration",
                "samples": args.calibration_samples,
                "seq_len": args.calibration_seq_len,
                "seed": 0,
            },
            "latency_runs": runs,
            "torch_threads": torch.get_num_threads(),
        },
        "torch_pruning": torch_pruning,
        "results": rows_out,
    }


def markdown(body: dict) -> str:
    rows = body["results"]
    settings = body["settings"]
    perplexity = settings["evaluation"]["perplexity"]
    calibration = settings["calibration"]
    baseline = rows[0]
    lines = [
        "# Structured pruning curve: SmolLM2-135M FFN channels",
        "",
        f"Perplexity on the built-in enwiki evaluation text (seq_len {perplexity['seq_len']}, "
        f"{perplexity['windows']} windows, {perplexity['scored_tokens']} tokens scored). "
        f"Activation criterion calibrated on {calibration['samples']} x {calibration['seq_len']} "
        "tokens of enwiki-calibration. Latency: median forward time, all models interleaved run "
        f"by run ({settings['latency_runs']['b1x128']} runs at b1 x 128, "
        f"{settings['latency_runs']['b32x128']} at b32 x 128), float32 on "
        f"{body['machine']['cpus']} shared CPU cores, {settings['torch_threads']} torch threads, "
        "as a ratio to the unpruned model. Size: the safetensors file `export.save_model` "
        f"writes. Reproduce: `{body['command']}`.",
        "",
        "| method | FFN removed | FFN width | perplexity | params (M) | size (MB) "
        "| latency b1x128 | latency b32x128 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency = [
            f"{row[key]:.2f} ({row[key.replace('ratio', 'ms')]:.0f} ms)"
            if key in row
            else "same shapes"
            for key in ("latency_b1x128_ratio", "latency_b32x128_ratio")
        ]
        lines.append(
            f"| {row['method']} | {row['ffn_channels']:.0%} | {row['intermediate_size']} "
            f"| {row['perplexity']:.2f} | {row['parameters'] / 1e6:.1f} "
            f"| {row['size_bytes'] / 1e6:.0f} | {latency[0]} | {latency[1]} |"
        )
    torch_pruning = body["torch_pruning"]
    lines += ["", "## Torch-Pruning", ""]
    if torch_pruning.get("version"):
        lines.append(
            f"torch-pruning {torch_pruning['version']} in a separate venv "
            f"({torch_pruning['python']}), {torch_pruning['seconds']:.0f} s for all its models: "
            "its DependencyGraph traces SmolLM2 under transformers 5.24 (RMSNorm weights passed "
            "as unwrapped parameters) and groups gate_proj/up_proj rows with down_proj columns "
            "exactly as Slimformer does; `magnitude` is its GroupMagnitudeImportance (L2, no "
            "data), `taylor` its GroupTaylorImportance on language-model loss gradients from the "
            "same calibration tokens. Same channel counts per layer, so the same shapes and "
            "latency as Slimformer's rows."
        )
    else:
        lines.append("Not run: no `--torch-pruning` Python was given.")
    best = []
    for fraction in sorted({row["ffn_channels"] for row in rows[1:]}):
        at = sorted(
            (r for r in rows if r["ffn_channels"] == fraction), key=lambda r: r["perplexity"]
        )
        best.append(f"{fraction:.0%}: {at[0]['method']} ({at[0]['perplexity']:.1f})")
    load = body["machine"]["load_average_at_end"]
    lines += [
        "",
        f"Baseline perplexity {baseline['perplexity']:.2f}. Lowest perplexity at each fraction: "
        + "; ".join(best)
        + ".",
        "",
        f"Load average at the end of the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1 / 5 / 15 min): when other work shares the cores the absolute times are inflated; "
        "the ratios compare runs interleaved with the original's.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--torch-pruning-worker":
        torch_pruning_worker(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=256)
    parser.add_argument("--b1-runs", type=int, default=10)
    parser.add_argument("--b32-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--torch-pruning",
        default="/tmp/tpvenv/bin/python" if Path("/tmp/tpvenv/bin/python").exists() else None,
        help="a Python with torch-pruning installed (default: /tmp/tpvenv/bin/python if present)",
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("SLIMFORMER_TEST_CACHE", str(Path.home() / ".cache/slimformer")),
        help="where SmolLM2 is converted from GGUF once",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimformer-structured-") as work:
        body = measure(args, Path(work))  # the saved models take GBs: removed at the end
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(body, indent=2) + "\n")
    (RESULTS / "structured.md").write_text(markdown(body))
    print(markdown(body))


if __name__ == "__main__":
    main()
