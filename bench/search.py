"""Accuracy-aware search against the best uniform recipe and an INC-style "basic" strategy.
Writes bench/results/search.{json,md} (rows kept per (model, target) across runs).

    nice -n 10 .venv/bin/python -m bench.search --model smollm2 --targets 0.01 0.02 0.05 0.10
    nice -n 10 .venv/bin/python -m bench.search --model minilm --targets 0.005 0.01

SmolLM2-135M: perplexity may rise by the target (enwiki evaluation text; the search split is the
texts after the reported 8 x 256-token windows, searched on 3 x 256 tokens, as the SmolLM2 test
does). MiniLM: the mean embedding cosine to the original may fall by the target (lee sentences;
the search split follows the reported 64 texts). Every run starts from the job's default space
(`defaults.default_recipe`: RTN 3-bit g64, ladder 3 → 4 → 8 bits, then per-block mixed
precision among them and float), with the job's budget of 16 trials.

- search (`strategy="auto"`): per target. The sensitivities are measured once per model, cold, by
  the first target; the later targets read them from the cache. `cold_wall_s` adds the cold
  measurement's seconds back to a warm run: the time a first search on the model takes.
- uniform: the ladder's held rung (the ladder stops at the first that holds, so it is the best
  uniform recipe of the same space), measured on the reported split.
- basic (INC's "basic" tuning): the aggressive recipe, then one block at a time back to float in
  model order, keeping earlier fallbacks, until it holds. Its sequence of candidates does not
  depend on the target, so it runs once (to the tightest target or 16 trials) and each target's
  result is the first of its trials that holds it: its trials and seconds are those up to there.
Every chosen model is also measured on the reported split, which no search reads. Bits per weight
are over the searched (block) layers; `linear_bits_per_weight` also counts the float head.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import results_file
from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.evaluation import Evaluator, _weight_bytes
from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
from workers.compression.loading import load_model
from workers.compression.quant import ATTRIBUTE
from workers.compression.recipe import EvaluationSettings, Recipe
from workers.compression.search import Targets, footprint, search, search_split
from workers.compression.search.defaults import default_recipe
from workers.compression.search.sensitivity import DirectoryCache
from workers.compression.search.space import stored_bits, units

MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", "enwiki-evaluation", "perplexity"),
    "minilm": ("all-MiniLM-L6-v2", "lee-sentences", "embedding_cosine"),
}
REPORTED = {
    "smollm2": EvaluationSettings(seq_len=256, max_windows=8),
    "minilm": EvaluationSettings(seq_len=128, max_samples=64),
}
SEARCH = {
    "smollm2": EvaluationSettings(seq_len=256, max_windows=3),
    "minilm": EvaluationSettings(seq_len=128, max_samples=48),
}
CALIBRATION = {"smollm2": "enwiki-calibration", "minilm": "lee-sentences"}
MAX_TRIALS = 16
NOTES = """
Notes (2026-12-07):
- MiniLM (default space 3 → 4 → 8 bits): the best uniform recipe that holds is 8-bit at both
  targets; the search is 7.4% (0.5%) and 14.7% (1%) fewer bits, within the target on the reported
  split, in 4 trials and about a minute cold on a quiet machine.
- With a 6-bit per-channel rung in the ladder (tried, then taken out: defaults.py says why; rows
  in this file at commit 4032e51, measured at load 12-27): uniform 6-bit misses 0.5% and holds 1%;
  the search gave 6.40 bits at 0.5% (20.7% fewer than uniform 8-bit; 0.501% on the reported
  split, a hair over) and 5.80 at 1% (4.3% fewer than uniform 6-bit).
- basic (INC-style): from RTN 3-bit, every block but the last back to float still misses both
  MiniLM targets (the last block alone at 3 bits is over them); the candidates run out after 6.
- SmolLM2 (default space, quiet machine): at 5% the search is 7.46 bits/weight vs 8.05 for uniform
  8-bit, **7.3% fewer: the issue's >= 20% target is not met**; reported split +4.79% (holds). At
  10%: 6.63 bits, 17.6% fewer, but +10.66% on the reported split (held 10% on the search split:
  the two splits differ by more than the margin). basic: 16 trials (its budget) from RTN 3-bit
  with blocks 0-14 back to float, none holds 5% or 10%; the search holds in 4-5 trials.
- SmolLM2 uniform rungs on its 3 x 256-token search split, measured ad hoc in the same session:
  RTN 4-bit g64 +41%, 5-bit g64 +11.3%, 6-bit per channel +3.6%, 8-bit per channel +0.4%; gate/up
  at 4-bit with the rest at 8-bit +10.6% (half the block weights). 20% fewer bits than uniform
  8-bit (<= 6.44) needs ~45% of the weights at 4-bit g64 within 5%: not reached with RTN blocks.
- Wall seconds: the machine is shared by other benches; compare within a row only. A cold
  search pays the sensitivity measurement; `cold_wall_s` adds it back to the warm runs.

Notes (2026-12-07, later; the machine at load 14-21 on its 2 cores throughout, ~0.1 core each):
- W8A8 space (`--method w8a8`: one `w8a8` stage, dynamic activations; the search gives each block
  W8A8 or float): at 5% uniform W8A8 holds (+2.74% on the search split, usage 0.55), so the
  search stops after that one trial: nothing in the space is smaller (the mixed step is skipped
  when the most aggressive rung holds; before, it measured 30 sensitivities and evaluated the same
  all-W8A8 choice again). Its bits/w equal uniform W8A8 (8.05): a W8A8 space can only trade W8A8 for
  float, so it saves nothing against its own uniform rung (reported split +2.10%, 1 trial, 174 s
  at load ~17); a tighter target (1%: uniform misses
  it) is where its mixed step works, not measured here.
- GPTQ (`--method gptq --bits 4 --calibration 16x512 --no-basic`, SmolLM2, 5%): NOT MEASURED to
  the end. Killed after 33 minutes: the ladder done, the sensitivity pass at 16 of 60
  (block, option) steps after ~18 minutes (about 1 min per step at load ~17; each step is GPTQ of
  one block from its cached Hessian factors plus one proxy pass). First blocks' proxy KL: GPTQ 4-bit
  0.0113 and 0.0106, 8-bit 7.5e-5 and 4.8e-5. Whether GPTQ 4/8 mixed reaches <= 6.44 bits/w
  (20% fewer than uniform 8-bit) within 5% is still open: rerun that command on a quiet machine.
- SmolLM2 RTN at 1% and 2% (`--targets 0.01 0.02`): NOT MEASURED. Killed after 28 minutes: the
  three ladder trials took 3-6 minutes each and the sensitivity pass was at 8 of 90 steps.
- Per-layer units (`--granularity layer`): not measured (no block-granularity GPTQ pick to
  compare with).

Notes (2026-12-07, stop 20; the machine at load 2.5-5, other benches beside it; rows run without
nice although the commands above say nice -n 10):
- SmolLM2 RTN 1% and 2% (block units): at 1% the search's only held pick is uniform 8-bit (the
  mixed step's pick was all-8-bit; it is now recognised as that rung and its ladder trial reused,
  not measured again); at 2%, 7.93 bits/w, 1.5% fewer, +0.75% reported. RTN's 4-bit rung (+41%)
  is far too coarse a step for targets this tight: each block moved to 4-bit costs about 1.4%.
- SmolLM2 RTN 5% per layer (210 units, 630 sensitivities in ~6 min): 6.65 bits/w, 17.4% fewer than
  uniform 8-bit (block units: 7.46, 7.3%), but +5.67% on the reported split: it held on the search
  split (usage 0.99 after five repairs, each promoting one layer) and not on the reported one.
  The search split (3 windows x 256 tokens) is too small to tell 5% from 5.7%; the issue's 20%
  (<= 6.44 bits/w) is still not reached with RTN, by layer or by block.
- SmolLM2 W8A8 space at 1% and 2%: uniform W8A8 misses both (+2.10% reported at 5%); the search
  keeps W8A8 where it costs least: 11.24 bits/w at 1% (+1.00% reported, at the limit) and 8.85 at
  2% (+1.22%), against float32 (32 bits/w), the only uniform choice that holds.
- MiniLM 2%, 5%, 10%: 6.28 (22.1% fewer than uniform 8-bit), 4.93 (38.9% fewer) and, at 10%
  where uniform 4-bit holds (4.50), 4.17 bits/w (7.4% fewer), all within target on the reported
  split; basic holds only at 10%, with 27.25 bits/w (most blocks float).
- GPTQ as the 4-bit option (`--method gptq --bits 4 --calibration 16x512`, 5%, load 1.5-3.3):
  6.86 bits/w, 14.7% fewer than uniform 8-bit (RTN blocks: 7.46, 7.3%), +4.98% on the reported
  split (holds), 4 trials, 476 s cold (sensitivity 118 s: 60 steps in one pass). Uniform GPTQ 4-bit
  g64 costs +27.9% on the search split (RTN 4-bit: +43.8%), so about twice as many blocks can go
  to 4 bits. The issue's 20% (<= 6.44 bits/w) is still not reached; GPTQ per layer, the next
  candidate, was not run.

Notes (2026-12-07, stop 21; load 3-5, other benches beside it, without nice):
- GPTQ per layer, 5% (`--method gptq --bits 4 --calibration 16x512 --granularity layer
  --search-windows 8 --no-basic`): **5.67 bits/w, 29.5% fewer than uniform 8-bit (8.05): the
  issue's >= 20% target is met**, +3.31% on the reported split (holds), 7 trials, 1,424 s cold
  (420 GPTQ sensitivities in one pass, ~8 min). Searched on 8 windows, as a job searches
  (`workers/search_job.SEARCH_SETTINGS`); the earlier rows searched on 3.
- The same search on 3 windows with the mixed step as it was (killed after 5 trials; not a row):
  the first pick missed (usage 1.12), one repair promoting one layer made it hold at 0.20 (5.77
  bits/w), the refit then took the scale from that trial (x0.2) and picked near-uniform 4-bit
  (usage 4.37), and the search went on repairing it one layer at a time. Since fdd65d8 a unit whose
  promotion cut the usage by more than twice its predicted share keeps its option, a refined pick
  that misses bisects the scale instead of being repaired, and one step loosens the budget at most
  2x: on 8 windows the trials were 0.58 (held, 5.85 bits/w) -> 1.43 -> 1.04 -> 0.70 (held, 5.67)
  -> 1.11, and it stopped with the budget scale bracketed within 5%.
"""


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in builtin_dataset_jsonl(name).splitlines()]


def drop(metric: str, baseline: float, value: float) -> float:
    """The relative loss: a rise for perplexity, a fall for the others."""
    change = (value - baseline) / baseline
    return change if metric == "perplexity" else -change


def block_bits(model, layer_names: list[str], float_bits: int) -> float:
    """Bits per weight the export stores for `layer_names` (packed codes and scales, or float)."""
    bits, weights = 0, 0
    for name in layer_names:
        module = model.get_submodule(name)
        shape = (module.out_features, module.in_features)
        quant = getattr(module, ATTRIBUTE, None)
        option = None
        if quant is not None:
            from workers.compression.recipe import WeightOnlyConfig

            option = WeightOnlyConfig(
                method="rtn",
                bits=quant.bits,
                group_size=quant.group_size,
                symmetric=quant.symmetric,
            )
        if quant is None and not isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            bits += 8 * _weight_bytes(module)  # W8A8: int8 weights and their scales
        else:
            bits += stored_bits(shape, option, float_bits)
        weights += shape[0] * shape[1]
    return bits / weights


def describe(model, layer_names, reported, metric, baseline) -> dict:
    size, linear_bits = footprint(model, 32)
    value = reported.measure(model, folder=None)[metric]
    return {
        "bits_per_weight": round(block_bits(model, layer_names, 32), 4),
        "linear_bits_per_weight": round(linear_bits, 4),
        "size_bytes": size,
        "reported": value,
        "reported_drop": round(drop(metric, baseline, value), 5),
    }


def start_recipe(task: str, method: str, bits: int | None, activations: str = "dynamic") -> Recipe:
    """The job's default space (`default_recipe`), or the same with `method` and/or `bits`; or the
    W8A8 space (every targeted layer W8A8, then per unit W8A8 or float)."""
    if method == "w8a8":
        return Recipe.model_validate({"stages": [{"method": "w8a8", "activations": activations}]})
    recipe = default_recipe(task, "cpu")
    update = {"method": method} if method != recipe.stages[0].method else {}
    if bits is not None:
        update["bits"] = bits
    if not update:
        return recipe
    return Recipe.model_validate({"stages": [{**recipe.stages[0].model_dump(), **update}]})


def run_model(
    model_key: str,
    target_list: list[float],
    cache_dir: Path,
    save,
    *,
    method: str = "rtn",
    bits: int | None = None,
    calibration_spec: tuple[int, int] = (16, 512),
    granularity: str = "block",
    basic: bool = True,
    activations: str = "dynamic",
    search_windows: int | None = None,
) -> list[dict]:
    """The rows of one model; `save(rows)` is called as they fill (a long run keeps its part)."""
    builtin, dataset, metric = MODELS[model_key]
    loaded = load_model(builtin_model_folder(builtin, cache_dir), device="cpu")
    texts = records(dataset)
    recipe = start_recipe(loaded.task, method, bits, activations)
    calibration = None
    if recipe.stages[0].needs_calibration:
        samples, seq_len = calibration_spec
        calibration = calibration_batches(
            [r["text"] for r in records(CALIBRATION[model_key])],
            loaded.tokenizer,
            num_samples=samples,
            seq_len=seq_len,
            seed=0,
        )
    search_settings = SEARCH[model_key]
    if search_windows is not None:
        search_settings = search_settings.model_copy(update={"max_windows": search_windows})
    space = {
        "start": recipe.stages[0].model_dump(mode="json"),
        "granularity": granularity,
        "calibration": list(calibration_spec) if calibration else None,
        **({"search_windows": search_windows} if search_windows is not None else {}),
    }
    reported_settings = REPORTED[model_key].model_copy(update={"metrics": [metric]})
    split, _ = search_split(texts, reported_settings, loaded.tokenizer, loaded.task)
    reported = Evaluator.for_model(loaded, settings=reported_settings, records=texts, device="cpu")
    baseline = reported.measure(loaded.model, folder=None)[metric]
    layer_names = [n for u in units(loaded.model, recipe.stages[0]) for n in u.layers]

    def run(target: float, strategy: str, cache) -> tuple:
        torch.manual_seed(0)
        started = time.perf_counter()
        result = search(
            loaded.model,
            task=loaded.task,
            tokenizer=loaded.tokenizer,
            targets=Targets(max_metric_drop={metric: target}, max_trials=MAX_TRIALS),
            recipe=recipe,
            calibration=calibration,
            search_records=split,
            settings=search_settings,
            device="cpu",
            model_sha=builtin,
            cache=cache,
            strategy=strategy,
            granularity=granularity,
            progress=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True),
            on_trial=lambda trial: print(json.dumps(_brief(trial)), flush=True),
        )
        return result, time.perf_counter() - started

    rows = []
    with tempfile.TemporaryDirectory() as cold:
        cache = DirectoryCache(Path(cold))
        cold_sensitivity_s = None
        for target in sorted(target_list):
            result, wall = run(target, "auto", cache)
            sensitivity = result.report.get("sensitivity") or {}
            if not sensitivity.get("cached", True):
                cold_sensitivity_s = sensitivity["seconds"]
            chosen = result.trials[result.report["chosen_trial"]]
            row = {
                "model": model_key,
                "metric": metric,
                "target": target,
                "space": space,
                "baseline_reported": baseline,
                "search": {
                    **describe(result.model, layer_names, reported, metric, baseline),
                    "held_search_split": result.targets_met,
                    "kind": chosen["kind"],
                    "trials": len(result.trials),
                    "wall_s": round(wall, 1),
                    "sensitivity_cached": sensitivity.get("cached"),
                    "sensitivity_s": sensitivity.get("seconds"),
                    "cold_wall_s": round(
                        wall + ((cold_sensitivity_s or 0) if sensitivity.get("cached") else 0), 1
                    ),
                    "recipe": result.recipe.model_dump(mode="json"),
                    "trial_log": [_brief(t) for t in result.trials],
                },
            }
            held_rungs = [t for t in result.trials if t["kind"] == "ladder" and t["held"]]
            if held_rungs:
                rung = held_rungs[0]
                model = compress(
                    copy.deepcopy(loaded.model), Recipe(**rung["recipe"]), calibration
                ).model
                row["uniform"] = {
                    **describe(model, layer_names, reported, metric, baseline),
                    "recipe": rung["recipe"],
                }
                del model
            else:
                row["uniform"] = None
            rows.append(row)
            save(rows)

    if not basic:
        return rows
    # Basic: one run to the tightest target (its candidates do not depend on the target).
    basic, basic_wall = run(min(target_list), "basic", None)
    search_baseline = basic.report["baseline"][metric]
    overhead = basic_wall - sum(t["seconds"] for t in basic.trials)  # baseline measurement
    for row in rows:
        target = row["target"]
        held = [
            t
            for t in basic.trials
            if drop(metric, search_baseline, t["metrics"][metric]) <= target + 1e-12
        ]
        trial = held[0] if held else None
        if trial is None:
            row["basic"] = {
                "held_search_split": False,
                "trials": len(basic.trials),
                "wall_s": round(basic_wall, 1),
            }
            continue
        count = trial["index"] + 1
        model = compress(copy.deepcopy(loaded.model), Recipe(**trial["recipe"]), calibration).model
        row["basic"] = {
            **describe(model, layer_names, reported, metric, baseline),
            "held_search_split": True,
            "trials": count,
            "wall_s": round(overhead + sum(t["seconds"] for t in basic.trials[:count]), 1),
        }
        del model
    save(rows)
    return rows


def _brief(trial: dict) -> dict:
    keys = ("index", "kind", "bits_per_weight", "size_bytes", "usage", "held", "seconds")
    return {
        **{k: trial[k] for k in keys},
        "predicted_usage": trial.get("predicted_usage"),
        "metrics": trial["metrics"],
    }


def space_label(row: dict) -> str:
    """The searched space of a row: its starting rung, unit granularity and calibration (rows
    before the space was recorded: the default, RTN 3-bit g64 per block)."""
    space = row.get("space") or {"start": {"method": "rtn", "bits": 3, "group_size": 64}}
    start = space["start"]
    group = "channel" if start.get("group_size") == -1 else f"g{start.get('group_size')}"
    if start["method"] == "w8a8":
        label = f"w8a8 {start['activations']} activations"
    else:
        label = f"{start['method']} {start['bits']}-bit {group}"
    if start.get("method") == "gptq":
        label += " act_order" if start.get("act_order", True) else ""
    if space.get("granularity", "block") != "block":
        label += f", per {space['granularity']}"
    if space.get("calibration"):
        label += f", calib {space['calibration'][0]}x{space['calibration'][1]}"
    if space.get("search_windows"):
        label += f", search split {space['search_windows']} windows"
    return label


def row_key(row: dict) -> tuple:
    return (row["model"], space_label(row), row["target"])


def _cell(part: dict | None, reference: dict | None = None) -> str:
    if part is None:
        return "none holds"
    if "bits_per_weight" not in part:
        return f"none holds in {part['trials']} trials ({part['wall_s']} s)"
    text = f"{part['bits_per_weight']:.2f}"
    if reference is not None and reference.get("bits_per_weight"):
        saving = 1 - part["bits_per_weight"] / reference["bits_per_weight"]
        if saving >= 0:
            text += f" ({saving:.1%} fewer than uniform)"
        else:
            text += f" ({-saving:.1%} more than uniform)"
    return text


def markdown(rows: list[dict], meta: dict) -> str:
    header = [
        "model", "space (start)", "target", "uniform bits/w (reported drop)", "search bits/w",
        "search trials / wall s (cold)", "search reported drop", "basic bits/w",
        "basic trials / wall s", "basic reported drop",
    ]  # fmt: skip
    cells = []
    for row in sorted(rows, key=row_key):
        auto, uniform, basic = row["search"], row.get("uniform"), row.get("basic") or {}
        cells.append(
            [
                row["model"],
                space_label(row),
                f"{row['target']:.1%}",
                "none holds"
                if uniform is None
                else f"{uniform['bits_per_weight']:.2f} ({uniform['reported_drop']:+.2%})",
                _cell(auto, uniform) + ("" if auto["held_search_split"] else " (missed)"),
                f"{auto['trials']} / {auto['wall_s']} ({auto['cold_wall_s']})",
                f"{auto['reported_drop']:+.2%}",
                _cell(basic, uniform) if basic else "not run",
                f"{basic.get('trials', '-')} / {basic.get('wall_s', '-')}",
                f"{basic['reported_drop']:+.2%}" if "reported_drop" in basic else "-",
            ]
        )
    runs = "\n".join(f"- `{run['command']}`: load average {run['load']}" for run in meta["runs"])
    return (
        "# Accuracy-aware search (bench/search.py)\n\n"
        "Bits per weight over the searched block layers (float32 scales counted); drops are "
        "relative (perplexity rise, cosine fall), on the reported split the search never reads.\n"
        "Wall times on a shared 2-core machine: compare within a row only.\n\n"
        f"{runs}\n\n" + results_file.table(header, cells) + NOTES
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--targets", nargs="+", type=float, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench")
    parser.add_argument("--method", choices=["rtn", "gptq", "w8a8"], default="rtn")
    parser.add_argument("--activations", choices=["dynamic", "static"], default="dynamic")
    parser.add_argument("--bits", type=int, help="the starting rung's bits (default: the space's)")
    parser.add_argument(
        "--calibration", default="16x512", help="SAMPLESxSEQ_LEN, for a method that needs it"
    )
    parser.add_argument("--granularity", choices=["block", "layer"], default="block")
    parser.add_argument(
        "--search-windows",
        type=int,
        help="perplexity windows of the search split (default 3; a job searches on 8)",
    )
    parser.add_argument("--no-basic", action="store_true", help="skip the INC-style baseline")
    args = parser.parse_args()
    samples, seq_len = (int(part) for part in args.calibration.split("x"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before = os.getloadavg()
    # The command as run: `nice -n N` only when the process was niced.
    niceness = os.nice(0)
    command = (f"nice -n {niceness} " if niceness else "") + ".venv/bin/python -m bench.search "
    command += shlex.join(sys.argv[1:])

    def save(new: list[dict]) -> None:
        load = f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        for row in new:
            row["command"], row["load"] = command, load
        rows = results_file.merged_rows("search", new, key=row_key)
        path = results_file.RESULTS / "search.json"
        runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
        runs = [r for r in runs if r["command"] != command] + [{"command": command, "load": load}]
        meta = {"machine": results_file.machine(), "threads": torch.get_num_threads(), "runs": runs}
        results_file.write("search", {**meta, "results": rows}, markdown(rows, meta))
        print(markdown(rows, meta), flush=True)

    run_model(
        args.model,
        args.targets,
        args.cache_dir,
        save,
        method=args.method,
        bits=args.bits,
        calibration_spec=(samples, seq_len),
        granularity=args.granularity,
        basic=not args.no_basic,
        activations=args.activations,
        search_windows=args.search_windows,
    )


if __name__ == "__main__":
    main()
