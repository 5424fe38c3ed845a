"""Accuracy-aware search: the smallest model that holds the job's targets, as one call.

1. Measure the original on the search split (`split.py`), and the sensitivity of every unit to
   every option (`sensitivity.py`; cached).
2. Ladder: uniform recipes from the given (most aggressive) one upwards, stopping at the first that
   holds.
3. Mixed: the exact knapsack (`solver.py`) picks per-unit options whose predicted usage of the
   allowed loss fits; the pick is evaluated for real and, while it misses, repaired by promoting the
   unit that costs most quality at its option (kept from then on when that helped far more than
   its sensitivity predicted). A pick that holds with room to spare re-scales the prediction and
   tries a smaller pick; a smaller pick that misses narrows the scale by bisection (`_mixed`).
4. Every evaluated candidate is a trial (`trials.py`), kept in the trial store so that a resumed
   search does not evaluate it again; the Pareto front of usage vs the objective is marked.
5. Always a result: the held trial with the smallest objective, or, if none held within the budget,
   the trial closest to the targets.

Usage ≈ alpha * (sum of the chosen options' sensitivities) is the search's one modelling
assumption (losses add, as HAWQ and the OBS family assume); alpha is fitted on real trials.
`compress` stays the verb for one recipe: every trial is a `compress` call on a copy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.compression.engine import compress
from workers.compression.evaluation import (
    Evaluator,
    _weight_bytes,
    linear_layer_names,
    tensor_bytes,
)
from workers.compression.quant import ATTRIBUTE
from workers.compression.recipe import EvaluationSettings, Recipe, WeightOnlyConfig
from workers.compression.search import sensitivity as sensitivity_module
from workers.compression.search.sensitivity import Proxy, SensitivityCache
from workers.compression.search.solver import solve
from workers.compression.search.space import (
    SearchableStage,
    ladder,
    mixed_recipe,
    options,
    searchable_stage,
    stored_bits,
    unit_bits,
    units,
)
from workers.compression.search.targets import Targets
from workers.compression.search.trials import MemoryTrialStore, TrialStore, mark_pareto

# The proxy reads at most this many search windows / texts, each cut to PROXY_TOKENS: enough to
# rank units, cheap enough to run once per (unit, option) (SmolLM2: 30 blocks x 2 options, about
# 1 s each on 2 CPU cores with 2 x 128 tokens; 4 x 256 took four times as long).
PROXY_INPUTS = 2
PROXY_TOKENS = 128
# A held pick is re-solved with the fitted scale only when that loosens the budget by this much;
# one refinement step loosens it at most MAX_LOOSEN times.
REFINE_MIN_GAIN = 0.05
MAX_LOOSEN = 2.0
OBJECTIVE_KEYS = {"size": "size_bytes", "bits_per_weight": "bits_per_weight"}


class BudgetSpent(Exception):
    pass


@dataclass
class SearchResult:
    model: nn.Module
    recipe: Recipe
    trials: list[dict]
    report: dict  # metrics.search
    targets_met: bool
    message: str


@dataclass
class _State:
    targets: Targets
    baseline: dict
    evaluate_trial: Callable[[Recipe, str, dict], dict]
    trials: list[dict] = field(default_factory=list)
    budget_hit: bool = False


def search(
    model: nn.Module,
    *,
    task: str,
    tokenizer,
    targets: Targets,
    recipe: Recipe,
    calibration: list[torch.Tensor] | None,
    search_records: list[dict],
    settings: EvaluationSettings,
    device: torch.device | str,
    model_sha: str,
    cache: SensitivityCache | None = None,
    trial_store: TrialStore | None = None,
    progress: Callable[[str], None] | None = None,
    on_trial: Callable[[dict], None] | None = None,
    on_step: Callable[[], None] | None = None,
    granularity: str = "block",
    strategy: str = "auto",
) -> SearchResult:
    """Search from `recipe` (the most aggressive candidate) for the smallest model that holds
    `targets` on `search_records`. `model` is left as it came: every trial runs on a copy.
    `strategy` "basic" is the INC-style baseline the bench compares with: the aggressive recipe,
    then one unit at a time back to float, in model order."""
    started = time.perf_counter()
    store = trial_store or MemoryTrialStore()
    say = progress or (lambda message: None)
    metrics = list(targets.metrics) + (["latency"] if targets.objective == "latency" else [])
    evaluator = Evaluator(
        task=task,
        tokenizer=tokenizer,
        settings=settings.model_copy(update={"metrics": metrics}),
        records=search_records,
        device=device,
    )
    say("measuring the original on the search split")
    baseline = evaluator.measure(model, folder=None, on_step=on_step)
    float_bits = 8 * next(model.parameters()).element_size()
    resumed = store.load()
    spent_before = sum(trial["seconds"] for trial in resumed)
    best: dict = {}  # {"trial": dict, "model": nn.Module} of the best candidate so far

    def evaluate_trial(candidate_recipe: Recipe, kind: str, extra: dict) -> dict:
        described = candidate_recipe.model_dump(mode="json")
        for trial in state.trials:
            if trial["recipe"] == described:
                return trial
        index = len(state.trials)
        if index < len(resumed) and resumed[index]["recipe"] == described:
            trial = resumed[index]  # finished before a crash: not run again
            state.trials.append(trial)
            return trial
        elapsed = spent_before + time.perf_counter() - started
        if index >= targets.max_trials or (
            targets.max_seconds is not None and elapsed >= targets.max_seconds
        ):
            state.budget_hit = True
            raise BudgetSpent
        say(f"trial {index + 1}: {kind}")
        began = time.perf_counter()
        candidate = copy.deepcopy(model)
        result = compress(candidate, candidate_recipe, calibration)
        measured = evaluator.measure(result.model, folder=None, on_step=on_step)
        size_bytes, bits_per_weight = footprint(result.model, float_bits)
        usage = targets.usage(baseline, measured)
        worst = max(usage.values(), default=0.0)
        trial = {
            "index": index,
            "kind": kind,
            "recipe": described,
            "metrics": {k: v for k, v in measured.items() if _number(v)},
            "size_bytes": size_bytes,
            "bits_per_weight": round(bits_per_weight, 4),
            "seconds": round(time.perf_counter() - began, 3),
            "held": worst <= 1.0,
            "pareto": False,
            "usage": worst if math.isfinite(worst) else None,
            "usage_by_target": {k: (v if math.isfinite(v) else None) for k, v in usage.items()},
            **extra,
        }
        trial["objective_value"] = objective_value(trial, targets.objective)
        state.trials.append(trial)
        store.save(state.trials)
        if _better(trial, best.get("trial")):
            best.update(trial=trial, model=result.model)
        if on_trial is not None:
            on_trial(trial)
        return trial

    state = _State(targets=targets, baseline=baseline, evaluate_trial=evaluate_trial)
    report: dict = {"objective": targets.objective, "targets": targets.to_dict()}
    try:
        if strategy == "basic":
            _basic(state, model, recipe, granularity)
        else:
            _ladder_then_mixed(
                state,
                model,
                recipe,
                granularity,
                float_bits,
                report,
                calibration=calibration,
                model_sha=model_sha,
                cache=cache,
                say=say,
                evaluator=evaluator,
                on_step=on_step,
            )
    except BudgetSpent:
        pass

    trials = state.trials
    if not trials:
        raise ValueError("the search budget allowed no trial: raise budget.max_trials")
    for trial in trials:
        trial["usage_for_pareto"] = math.inf if trial["usage"] is None else trial["usage"]
    mark_pareto(trials, "objective_value", quality_key="usage_for_pareto")
    for trial in trials:
        del trial["usage_for_pareto"]
    store.save(trials)
    chosen = min(trials, key=_rank)
    held = chosen["held"]
    report.update(
        chosen_trial=chosen["index"],
        stopped="held" if held else ("budget" if state.budget_hit else "exhausted"),
        baseline=baseline,
        seconds=round(spent_before + time.perf_counter() - started, 3),
        granularity=granularity,
        strategy=strategy,
    )
    if best.get("trial") is chosen:
        final = best["model"]
    else:  # chosen in an earlier attempt: compress it again (deterministic)
        say("compressing the chosen candidate again")
        final = compress(
            copy.deepcopy(model), Recipe.model_validate(chosen["recipe"]), calibration
        ).model
    return SearchResult(
        model=final,
        recipe=Recipe.model_validate(chosen["recipe"]),
        trials=trials,
        report=report,
        targets_met=held,
        message=_message(chosen, len(trials)),
    )


def _ladder_then_mixed(
    state,
    model,
    recipe,
    granularity,
    float_bits,
    report,
    *,
    calibration,
    model_sha,
    cache,
    say,
    evaluator,
    on_step,
) -> None:
    rungs = ladder(recipe)
    ladder_trials = []
    for rung in rungs:
        trial = state.evaluate_trial(rung, "ladder", {})
        ladder_trials.append((rung, trial))
        if trial["held"]:
            break
    stage = searchable_stage(recipe)
    if stage is None:
        return
    if ladder_trials[0][1]["held"]:
        # The most aggressive rung holds: every unit already has the cheapest option, so no mixed
        # choice is smaller (a W8A8 space that holds uniformly, or an RTN one at a loose target).
        return
    choices = options(recipe)
    search_units = units(model, stage, granularity=granularity)
    losses = _sensitivities(
        model,
        search_units,
        choices,
        evaluator,
        report,
        calibration=calibration,
        model_sha=model_sha,
        cache=cache,
        say=say,
        on_step=on_step,
    )
    costs = [[unit_bits(unit, option, float_bits) for option in choices] for unit in search_units]
    alpha = _fit_scale(ladder_trials, choices, losses)
    if alpha is None:
        return
    _mixed(state, stage, choices, search_units, costs, losses, alpha)


def _mixed(state, stage, choices, search_units, costs, losses, alpha: float) -> None:
    """Pick under the budget 1/alpha; while the pick misses, repair it (promote the unit costing
    most quality at its option). Once a pick holds, refine: loosen the budget by the scale its
    usage fits (at most MAX_LOOSEN times a step); a refined pick that misses is not repaired
    (there is a held one) but bounds the scale, and the next budget lies halfway, in log scale,
    between the last that held and the loosest that missed, until they are within
    REFINE_MIN_GAIN. A unit whose promotion by a repair cut the usage by more than twice what its
    sensitivity predicts keeps at least that option in every later pick: losses do not add up
    for it (on SmolLM2, GPTQ per layer, promoting one layer took a pick from 1.12 to 0.20 of the
    allowance, where its sensitivity predicted 0.02)."""
    floor = [0] * len(search_units)  # the cheapest option each unit may take
    tried: set[str] = set()
    held: float | None = None  # the scale of the last pick that held
    missed: float | None = None  # the loosest scale whose refined pick missed
    while True:
        allowed = [
            [loss if j >= floor[i] else math.inf for j, loss in enumerate(row)]
            for i, row in enumerate(losses)
        ]
        pick = solve(costs, allowed, 1.0 / alpha)
        if pick is None:
            return
        pick_recipe = mixed_recipe(stage, [choices[j] for j in pick], search_units)
        if pick_recipe is None or pick_recipe.model_dump_json() in tried:
            return
        tried.add(pick_recipe.model_dump_json())
        predicted = sum(losses[i][j] for i, j in enumerate(pick))
        trial = state.evaluate_trial(pick_recipe, "mixed", {"predicted_usage": alpha * predicted})
        while not trial["held"] and held is None:
            worst = _worst(pick, losses, len(choices))
            if worst is None:
                return
            promoted = list(pick)
            promoted[worst] += 1  # one option up, towards float
            pick_recipe = mixed_recipe(stage, [choices[j] for j in promoted], search_units)
            if pick_recipe is None:
                return
            tried.add(pick_recipe.model_dump_json())
            before, predicted = trial["usage"], sum(losses[i][j] for i, j in enumerate(promoted))
            trial = state.evaluate_trial(
                pick_recipe, "repair", {"predicted_usage": alpha * predicted}
            )
            # Promoting it helped more than its sensitivity says: it stays promoted.
            expected = alpha * (losses[worst][pick[worst]] - losses[worst][promoted[worst]])
            after = trial["usage"]
            if before is not None and after is not None and before - after > 2 * expected:
                floor[worst] = promoted[worst]
            pick = promoted
        if trial["held"]:
            held = alpha
            if not predicted or trial["usage"] is None:
                return
            # It used less of the allowance than predicted: the scale was pessimistic. A pick
            # that used none of it (as good as the original, or better) gives no scale: halve.
            fitted = trial["usage"] / predicted if trial["usage"] > 0 else alpha / 2
            following = max(fitted, alpha / MAX_LOOSEN)
            if missed is not None:
                following = max(following, math.sqrt(held * missed))
        else:
            missed = alpha
            following = math.sqrt(held * missed)
        if following >= held * (1 - REFINE_MIN_GAIN):
            return
        alpha = following


def _basic(state, model, recipe, granularity) -> None:
    """INC's "basic" tuning: the aggressive recipe, then fall back one unit at a time to float,
    in model order, keeping earlier fallbacks, until it holds."""
    trial = state.evaluate_trial(recipe, "basic", {})
    stage = searchable_stage(recipe)
    if trial["held"] or stage is None:
        return
    search_units = units(model, stage, granularity=granularity)
    chosen: list[SearchableStage | None] = [stage] * len(search_units)
    for index in range(len(search_units)):
        chosen[index] = None
        candidate = mixed_recipe(stage, chosen, search_units)
        if candidate is None:
            return
        if state.evaluate_trial(candidate, "basic", {})["held"]:
            return


def _sensitivities(
    model, search_units, choices, evaluator, report, *, calibration, model_sha, cache, say, on_step
) -> list[list[float]]:
    proxy_inputs = _proxy_inputs(evaluator)
    key = sensitivity_module.cache_key(
        model_sha=model_sha,
        options=choices,
        units=search_units,
        data_sha=sensitivity_module.data_sha(proxy_inputs),
        calibration_sha=(
            sensitivity_module.data_sha(calibration)
            if calibration and any(c is not None and c.needs_calibration for c in choices)
            else None
        ),
    )
    measured = cache.get(key) if cache is not None else None
    cached = measured is not None
    if measured is None:
        say(f"measuring the sensitivity of {len(search_units)} units")
        proxy = Proxy(model, task=evaluator.task, inputs=proxy_inputs, device=evaluator.device)

        def step(done: int, total: int, message: str) -> None:
            if on_step is not None:
                on_step()
            if done == total or done % 10 == 0:
                say(f"sensitivity {done}/{total}: {message}")

        measured = sensitivity_module.measure(
            model, search_units, choices, proxy, calibration=calibration, on_step=step
        )
        if cache is not None:
            cache.put(key, measured)
    report["sensitivity"] = {
        **sensitivity_module.summary(search_units, choices, measured, cached=cached),
        "key": key,
    }
    return measured["losses"]


def _proxy_inputs(evaluator: Evaluator) -> list[torch.Tensor]:
    if evaluator.windows:
        return [ids[:, :PROXY_TOKENS] for ids, _ in evaluator.windows[:PROXY_INPUTS]]
    texts = evaluator.embedding_texts[: PROXY_INPUTS * 8]
    return [
        evaluator.tokenizer(text, return_tensors="pt", truncation=True, max_length=PROXY_TOKENS)[
            "input_ids"
        ]
        for text in texts
    ]


def _fit_scale(ladder_trials, choices, losses) -> float | None:
    """alpha in usage ≈ alpha * sum(sensitivity), from the uniform trial nearest the limit."""
    fits = []
    for rung, trial in ladder_trials:
        rung_stage = rung.stages[0] if len(rung.stages) == 1 else None
        option = next((j for j, c in enumerate(choices) if c is not None and c == rung_stage), None)
        usage = trial["usage"]
        if option is None or usage is None:
            continue
        total = sum(row[option] for row in losses)
        if total > 0 and usage > 0:
            fits.append((abs(math.log(usage)), usage / total))
    return min(fits)[1] if fits else None


def _worst(pick: list[int], losses: list[list[float]], num_options: int) -> int | None:
    """The unit whose option costs most quality, of those not yet float (None: all are)."""
    candidates = [i for i, j in enumerate(pick) if j < num_options - 1]
    return max(candidates, key=lambda i: losses[i][pick[i]]) if candidates else None


def footprint(model: nn.Module, float_bits: int) -> tuple[int, float]:
    """(bytes the export stores for the weights, bits per Linear weight) of a compressed model in
    memory: weight-only layers hold dequantized floats there but are stored packed."""
    size_bits = 8 * tensor_bytes(model)
    linear_bits, linear_weights = 0, 0
    for name in linear_layer_names(model):
        module = model.get_submodule(name)
        quant = getattr(module, ATTRIBUTE, None)
        weights = module.in_features * module.out_features
        weight = getattr(module, "weight", None)
        if quant is not None:
            held = 8 * weight.numel() * weight.element_size()
            option = WeightOnlyConfig(
                method="rtn",
                bits=quant.bits,
                group_size=quant.group_size,
                symmetric=quant.symmetric,
            )
            stored = stored_bits((module.out_features, module.in_features), option, float_bits)
            size_bits += stored - held
        elif isinstance(weight, nn.Parameter):
            stored = 8 * weight.numel() * weight.element_size()
        else:
            stored = 8 * _weight_bytes(module)
        linear_bits += stored
        linear_weights += weights
    return size_bits // 8, linear_bits / max(linear_weights, 1)


def objective_value(trial: dict, objective: str) -> float:
    if objective == "latency":
        return trial["metrics"].get("latency_ms_p50", math.inf)
    return trial[OBJECTIVE_KEYS[objective]]


def _rank(trial: dict) -> tuple:
    """Held trials first, by objective; then the rest, closest to the targets first."""
    usage = math.inf if trial["usage"] is None else trial["usage"]
    if trial["held"]:
        return (0, trial["objective_value"], usage)
    return (1, usage, trial["objective_value"])


def _better(trial: dict, other: dict | None) -> bool:
    return other is None or _rank(trial) < _rank(other)


def _message(chosen: dict, count: int) -> str:
    if chosen["held"]:
        return f"trial {chosen['index']} holds every target ({count} trials)"
    missed = [
        f"{name} by {100 * (usage - 1):.1f}% of its allowance"
        if usage is not None
        else f"{name} (not measured)"
        for name, usage in chosen["usage_by_target"].items()
        if usage is None or usage > 1
    ]
    return (
        f"no candidate held within {count} trials; the closest (trial {chosen['index']}) "
        f"missed {', '.join(missed)}"
    )


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = ["BudgetSpent", "SearchResult", "footprint", "search"]
