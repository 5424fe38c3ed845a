"""Accuracy-aware search against the best uniform recipe and an INC-style "basic" strategy.
Writes bench/results/search.{json,md}.

    .venv/bin/python -m bench.search [--cases smollm2-rtn:0.05 minilm-rtn:0.01 ...]

A case is `<model>-<method>:<target>`: SmolLM2-135M (perplexity, enwiki evaluation text, search
split after the reported 8 x 256-token windows) or MiniLM (embedding cosine, lee sentences, search
split after the reported 64 texts), from the recipe `<method>` 3-bit g64. For each: the search
(`strategy="auto"`: ladder, then mixed precision per block, repair), and the basic strategy (the
aggressive recipe, then one block at a time back to float, in model order), both with a cold
sensitivity cache and a budget of 16 trials; the best uniform recipe that holds is the ladder's.
Every chosen model is measured on the reported split (never read by the search).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench import results_file
from workers.compression import compress
from workers.compression.evaluation import Evaluator
from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
from workers.compression.loading import load_model
from workers.compression.recipe import EvaluationSettings, Recipe
from workers.compression.search import Targets, footprint, search, search_split
from workers.compression.search.sensitivity import DirectoryCache

DEFAULT_CASES = ("smollm2-rtn:0.05", "smollm2-rtn:0.02", "minilm-rtn:0.01")
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", "enwiki-evaluation", "perplexity"),
    "minilm": ("all-MiniLM-L6-v2", "lee-sentences", "embedding_cosine"),
}
REPORTED = EvaluationSettings(seq_len=256, max_windows=8, max_samples=64)
SEARCH = EvaluationSettings(seq_len=256, max_windows=4, max_samples=64)


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in builtin_dataset_jsonl(name).splitlines()]


def run_case(case: str, cache_dir: Path) -> dict:
    model_key, target = case.split(":")
    model_name, method = model_key.split("-")
    builtin, dataset, metric = MODELS[model_name]
    loaded = load_model(builtin_model_folder(builtin, cache_dir), device="cpu")
    texts = records(dataset)
    split, _ = search_split(texts, REPORTED, loaded.tokenizer, loaded.task)
    reported = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=REPORTED.model_copy(update={"metrics": [metric]}),
        records=texts,
        device="cpu",
    )
    baseline = reported.measure(loaded.model, folder=None)
    targets = Targets(max_metric_drop={metric: float(target)})
    recipe = Recipe.model_validate({"stages": [{"method": method, "bits": 3, "group_size": 64}]})
    row: dict = {"case": case, "baseline": baseline[metric]}
    for strategy in ("auto", "basic"):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as cold:
            started = time.perf_counter()
            result = search(
                loaded.model,
                task=loaded.task,
                tokenizer=loaded.tokenizer,
                targets=targets,
                recipe=recipe,
                calibration=None,
                search_records=split,
                settings=SEARCH,
                device="cpu",
                model_sha=builtin,
                cache=DirectoryCache(Path(cold)),
                strategy=strategy,
            )
            wall = time.perf_counter() - started
        measured = reported.measure(result.model, folder=None)[metric]
        size, bits = footprint(result.model, 32)
        row[strategy] = {
            "bits_per_weight": round(bits, 3),
            "size_bytes": size,
            "reported": measured,
            "reported_drop": round(abs(measured - baseline[metric]) / baseline[metric], 5),
            "targets_met_search_split": result.targets_met,
            "trials": len(result.trials),
            "wall_s": round(wall, 1),
            "recipe": result.recipe.model_dump(mode="json"),
        }
        if strategy == "auto":
            uniform = [t for t in result.trials if t["kind"] == "ladder" and t["held"]]
            best = min(uniform, key=lambda t: t["bits_per_weight"]) if uniform else None
            if best is not None:
                model = compress(copy.deepcopy(loaded.model), Recipe(**best["recipe"])).model
                value = reported.measure(model, folder=None)[metric]
            row["uniform"] = (
                None
                if best is None
                else {
                    "bits_per_weight": best["bits_per_weight"],
                    "size_bytes": best["size_bytes"],
                    "reported": value,
                    "recipe": best["recipe"],
                }
            )
    return row


def markdown(rows: list[dict]) -> str:
    header = ["case", "uniform bits/w", "search bits/w (trials, s)", "basic bits/w (trials, s)"]
    header += ["reported drop: search / basic"]
    cells = []
    for row in rows:
        auto, basic, uniform = row["auto"], row["basic"], row.get("uniform")
        cells.append(
            [row["case"], uniform["bits_per_weight"] if uniform else "none holds"]
            + [f"{auto['bits_per_weight']} ({auto['trials']}, {auto['wall_s']})"]
            + [f"{basic['bits_per_weight']} ({basic['trials']}, {basic['wall_s']})"]
            + [f"{auto['reported_drop']:.2%} / {basic['reported_drop']:.2%}"]
        )
    return results_file.table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench")
    args = parser.parse_args()
    rows = [run_case(case, args.cache_dir) for case in args.cases]
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    results_file.write("search", {"machine": machine, "rows": rows}, markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
