"""Does column-order GPTQ lose to RTN only because SmolLM2's weights sit on a 4-bit grid?

SmolLM2 ships as a Q4_1 GGUF (blocks of 32 weights, 16 levels each: d·q + m), converted to float32:
every Linear weight is already on a 4-bit grid, which RTN may partly land on. This bench compares
`rtn`, `gptq` in column order and `gptq` with act_order (4-bit, groups of 64, symmetric) on

- `smollm2`: the shipped weights;
- `smollm2-offgrid`: the same, every block Linear weight moved by seeded uniform noise of one Q4_1
  step (U(-d/2, d/2), d = (max - min) / 15 of its 32-weight block): each weight is then anywhere in
  its cell, off any grid (its own FP32 perplexity is measured, and the methods compare against it);
- `minilm`: all-MiniLM-L6-v2, trained float weights (mean embedding cosine to its FP32 self).

Every row sees the same calibration windows (enwiki-calibration, seed 0) and the same evaluation
(SmolLM2: perplexity on enwiki-evaluation windows; MiniLM: lee-sentences), measured on the
in-memory model (the service measures the exported artifact; `bench.quant_peers` shows the two
agree). `--variants` adds GPTQ rows with other settings (damping, block size, static groups).

    nice -n 10 .venv/bin/python -m bench.gptq_grid                 # 64 x 512 calibration, 20 x 512
    nice -n 10 .venv/bin/python -m bench.gptq_grid --models minilm --samples 16 --windows 4

Writes bench/results/gptq_grid.{json,md}; rows of an earlier run with the same settings are kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
W4G64 = {"bits": 4, "group_size": 64}
METHODS = {
    "rtn": {"method": "rtn", **W4G64},
    "gptq-column-order": {"method": "gptq", **W4G64, "act_order": False},
    "gptq-act-order": {"method": "gptq", **W4G64, "act_order": True},
}
VARIANTS = {
    "gptq-column-order-damping-0.1": {
        "method": "gptq",
        **W4G64,
        "act_order": False,
        "damping": 0.1,
    },
    "gptq-column-order-block-64": {"method": "gptq", **W4G64, "act_order": False, "block_size": 64},
}
MODELS = ("smollm2", "smollm2-offgrid", "minilm")


def texts(name: str) -> list[str]:
    from workers.compression.examples import builtin_dataset_jsonl

    return [json.loads(line)["text"] for line in builtin_dataset_jsonl(name).splitlines()]


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    from workers.compression.layer_selection import linear_layers
    from workers.compression.recipe import RtnConfig

    targeted, _ = linear_layers(model, RtnConfig(method="rtn"))
    return {name: model.get_submodule(name) for name in targeted}


def grid_share(model: torch.nn.Module, block: int = 32, levels: int = 16) -> float:
    """Share of the 32-weight blocks (along each row) holding at most 16 distinct values: 1.0 for
    weights straight from a Q4 GGUF, about 0 for trained float weights."""
    on_grid = total = 0
    for linear in block_linears(model).values():
        w = linear.weight.detach().float()
        w = w.reshape(-1, block)
        distinct = (w.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1
        on_grid += int((distinct <= levels).sum())
        total += w.shape[0]
    return on_grid / total


def move_off_grid(model: torch.nn.Module, seed: int = 0, block: int = 32) -> None:
    """Every block Linear weight + U(-d/2, d/2), d its 32-block's Q4_1 step, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in block_linears(model).values():
            w = linear.weight
            rows = w.float().reshape(-1, block)
            step = (rows.amax(dim=1, keepdim=True) - rows.amin(dim=1, keepdim=True)) / 15
            noise = (torch.rand(rows.shape, generator=generator) - 0.5) * step
            w.copy_((rows + noise).reshape(w.shape).to(w.dtype))


def load(name: str, cache_dir: Path):  # noqa: ANN201
    from workers.compression.examples import builtin_model_folder
    from workers.compression.loading import load_model

    builtin = "all-MiniLM-L6-v2" if name == "minilm" else "SmolLM2-135M-Instruct"
    loaded = load_model(builtin_model_folder(builtin, cache_dir), device="cpu")
    if name == "smollm2-offgrid":
        move_off_grid(loaded.model)
    return loaded


def measure_model(args: argparse.Namespace, name: str, rows: list[str], cache_dir: Path) -> dict:
    from workers.compression import compress
    from workers.compression.data import calibration_batches
    from workers.compression.evaluation import Evaluator
    from workers.compression.recipe import EvaluationSettings, Recipe

    loaded = load(name, cache_dir)
    encoder = name == "minilm"
    seq_len = min(args.seq_len, 256) if encoder else args.seq_len
    calibration = calibration_batches(
        texts("enwiki-calibration"),
        loaded.tokenizer,
        num_samples=args.samples,
        seq_len=seq_len,
        seed=0,
    )
    settings = EvaluationSettings(
        metrics=["embedding_cosine" if encoder else "perplexity"],
        seq_len=args.seq_len,
        max_windows=args.windows,
        max_samples=args.texts,
    )
    evaluator = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=settings,
        records=[{"text": t} for t in texts("lee-sentences" if encoder else "enwiki-evaluation")],
        device="cpu",
    )
    metric = settings.metrics[0]
    fp32 = evaluator.measure(loaded.model, folder=None)[metric]  # the encoder's baseline
    result = {
        "model": name,
        "metric": metric,
        "fp32": fp32,
        "grid_share": grid_share(loaded.model),
        "calibration": {"samples": args.samples, "seq_len": seq_len, "seed": 0},
        "evaluation": evaluator.settings_record(),
        "rows": {},
    }
    print(f"{name}: fp32 {metric} {fp32:.4f}, on-grid share {result['grid_share']:.3f}", flush=True)
    recipes = {**METHODS, **VARIANTS}
    for row in rows:
        model = copy.deepcopy(loaded.model)
        started = time.perf_counter()
        outcome = compress(model, Recipe.model_validate({"stages": [recipes[row]]}), calibration)
        seconds = time.perf_counter() - started
        value = evaluator.measure(model, folder=None)[metric]
        summary = outcome.stages[0] if outcome.stages else {}
        summary = summary.get("summary", summary) if isinstance(summary, dict) else {}
        result["rows"][row] = {
            "recipe": recipes[row],
            metric: value,
            "vs_fp32": value / fp32,
            "compress_s": seconds,
            "mean_relative_weight_error": summary.get("mean_relative_weight_error"),
            "mean_relative_output_error": summary.get("mean_relative_output_error"),
        }
        print(f"  {row}: {metric} {value:.4f} ({seconds:.0f} s)", flush=True)
        del model
    return result


def markdown(body: dict) -> str:
    lines = [
        "# Column-order GPTQ vs RTN, on and off the 4-bit grid",
        "",
        f"Reproduce: `{body['command']}` (finished {body['finished_at']}).",
        "",
        "4-bit symmetric, groups of 64. `on-grid share`: the share of 32-weight blocks holding at "
        "most 16 distinct values (1.0: straight from a Q4 GGUF). Perplexity: lower is better; "
        "cosine: higher is better. In-memory model, CPU float32.",
        "",
        "| model | on-grid share | metric | FP32 | row | value | ×FP32 | mean rel. weight err. "
        "| mean rel. output err. | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in body["models"].values():
        for row, values in model["rows"].items():
            metric = model["metric"]
            weight = values.get("mean_relative_weight_error")
            output = values.get("mean_relative_output_error")
            lines.append(
                f"| {model['model']} | {model['grid_share']:.3f} | {metric} | {model['fp32']:.4f} "
                f"| `{row}` | {values[metric]:.4f} | {values['vs_fp32']:.3f} "
                f"| {'' if weight is None else f'{weight:.4f}'} "
                f"| {'' if output is None else f'{output:.4f}'} | {values['compress_s']:.0f} |"
            )
    lines += ["", body.get("conclusion", ""), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rows", nargs="+", default=list(METHODS))
    parser.add_argument("--variants", action="store_true", help="add the VARIANTS rows")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20, help="perplexity windows")
    parser.add_argument("--texts", type=int, default=256, help="MiniLM cosine texts")
    parser.add_argument("--cache-dir", type=Path, default=Path(".slimformer/bench-cache"))
    parser.add_argument("--results", default="gptq_grid")
    args = parser.parse_args()
    rows = list(args.rows) + (list(VARIANTS) if args.variants else [])
    torch.manual_seed(0)
    path = RESULTS / f"{args.results}.json"
    body = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    for name in args.models:
        measured = measure_model(args, name, rows, args.cache_dir)
        kept = body["models"].get(name)
        if (
            kept
            and kept["calibration"] == measured["calibration"]
            and kept["evaluation"] == (measured["evaluation"])
        ):
            measured["rows"] = {**kept["rows"], **measured["rows"]}
        body["models"][name] = measured
        body.update(
            command="nice -n 10 .venv/bin/python -m bench.gptq_grid " + " ".join(sys.argv[1:]),
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
            machine={"cpus": torch.get_num_threads(), "python": platform.python_version(),
                     "torch": torch.__version__},
        )  # fmt: skip
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(body, indent=2) + "\n")
        (RESULTS / f"{args.results}.md").write_text(markdown(body))


if __name__ == "__main__":
    main()
