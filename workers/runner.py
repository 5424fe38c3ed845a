"""Running one job: gather its inputs, measure the original, compress, export, measure the result.

The attempt around it (claim, heartbeat, fences, how it ends) is `workers.attempt`; fetching what
the job names is `workers.job_inputs`; writing, load-testing and packing the artifact is
`workers.packaging`. This module is the order of the work, and the metrics it reports.

Memory: the original model and the compressed one are never alive together with the export's
loaded copy. The in-memory model is compared with the export once and dropped; the result is
measured on the loaded export, which is what users run.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from workers.attempt import JobContext, run_attempt
from workers.job_inputs import (
    dataset_records,
    gather,
    load_student,
    preflight,
    read_job,
    streams,
)
from workers.packaging import artifact_name, package, write_export
from workers.result_cache import reuse_if_cached

QUALITY = ("perplexity", "embedding_cosine", "accuracy")


def run_job(job_id: str) -> None:
    # A job whose inputs equal an earlier succeeded one's ends before `execute` loads anything.
    run_attempt(job_id, execute, shortcut=reuse_if_cached)


def execute(context: JobContext, scratch: Path) -> tuple[dict, list[dict]]:
    """Load, measure the baseline, compress, export, load-test, measure the result."""
    import torch

    from workers.compression import compress
    from workers.compression.device import select_device
    from workers.compression.evaluation import Evaluator
    from workers.compression.export import verify
    from workers.compression.loading import load_model
    from workers.compression.recipe import EvaluationSettings, Recipe
    from workers.compression.registry import StageResources

    job = read_job(context.job_id)
    recipe = Recipe.model_validate(job.recipe)
    # A job with targets searches over recipes (`workers.search_job`): one "search" stage.
    methods = ["search"] if job.targets else [stage.method for stage in recipe.stages]
    context.stage_names = ["load", "baseline", *methods, "export", "evaluate"]
    context.progress(0, 0, 3, "preparing the model", force=True)

    inputs = gather(job)
    context.check()
    if recipe.required_device:
        device = torch.device(recipe.required_device)
    elif job.device == "cpu":  # a worker with a GPU may consume the cpu queue too (`serve`)
        device = torch.device("cpu")
    else:
        device = select_device()
    streamed = streams(recipe, inputs, device)
    preflight(inputs, device, streamed=streamed)
    torch.manual_seed(0)
    loaded = load_model(inputs.folder, device=device, streamed=streamed, scratch=scratch / "blocks")
    how = "one block at a time, the rest on disk" if streamed else "whole"
    context.progress(0, 1, 3, f"loaded {loaded.architecture} on {device} ({how})", force=True)
    calibration = inputs.calibration_batches(loaded.tokenizer)
    context.progress(0, 3, 3, "data ready", force=True)

    evaluation = {k: v for k, v in (job.evaluation or {}).items() if k != "dataset_id"}
    evaluator = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=EvaluationSettings.model_validate(evaluation),
        records=inputs.evaluation_records,
        device=device,
    )
    context.progress(1, 0, 1, "measuring the original model", force=True)
    baseline = evaluator.measure(loaded.model, folder=inputs.folder, on_step=context.check)
    context.log("baseline measured", {"baseline": baseline}, type="metric")

    def on_progress(update: Any) -> None:
        # Throttled, except a stage's last step: every stage shows up finished in the events.
        context.progress(
            2 + update.stage_index,
            update.step,
            update.total_steps,
            update.message,
            force=update.step == update.total_steps,
            data=update.data,
        )

    students: dict[int, Any] = {}  # id(model) -> LoadedModel of a distillation student

    def student_model(model_id: str) -> Any:
        student = load_student(model_id, loaded, device)
        students[id(student.model)] = student
        return student.model

    def measure_stage(index: int, model: Any) -> dict:
        # A pipeline reports what each stage cost and bought: quality after every stage.
        context.progress(2 + index, 1, 1, f"measuring the model after {methods[index]}", force=True)
        measured = evaluator.measure(model, folder=None, on_step=context.check, only=QUALITY)
        context.log(f"after stage {index} ({methods[index]})", {"metrics": measured}, type="metric")
        return measured

    resources = StageResources(
        tokenizer=loaded.tokenizer,
        texts=lambda dataset_id: [record["text"] for record in dataset_records(dataset_id)[0]],
        load_model=student_model,
    )
    context.clear_checkpoints = lambda: [inputs.checkpoints(i).clear() for i in range(len(methods))]
    chosen_recipe, search_metrics = job.recipe, {"trials": []}
    if job.targets:
        from workers.search_job import run_search

        found = run_search(context, job, loaded, inputs, calibration, device)
        result, chosen_recipe, search_metrics = found.result, found.recipe, found.metrics
        loaded.model = result.model  # the chosen candidate (a copy); the original is done with
    else:
        result = compress(
            loaded.model,
            recipe,
            calibration,
            progress=on_progress,
            checkpoints=inputs.checkpoints,
            resources=resources,
            after_stage=measure_stage,
        )
    context.clear_checkpoints()  # they exist to resume this stage; it is done
    context.check()
    if result.model is not loaded.model:  # a distilled student of its own: saved as itself
        loaded = students[id(result.model)]

    export_index = 2 + len(methods)
    context.progress(export_index, 0, 2, "writing the compressed model", force=True)
    draft = write_export(
        loaded, result.model, scratch, recipe=chosen_recipe, inputs=inputs.provenance
    )
    sample = loaded.tokenizer(
        inputs.evaluation_records[0]["text"], return_tensors="pt", truncation=True, max_length=64
    )["input_ids"]
    check = verify(draft, result.model, loaded.task, sample)
    context.progress(export_index, 1, 2, "export load-tested", force=True)
    stage_summaries = result.stages
    if check.artifact is not None:
        # The in-memory model has been compared with the export; from here on only the export
        # lives. Measure what users will run: the exported folder loaded the documented way (real
        # low-bit kernels where the device has them), not the model the methods left behind.
        deployed = check.artifact.model
        measured_on = "the exported artifact, loaded as `load_artifact` loads it"
        students.clear()
        del result
        loaded.model = None
    else:
        # Too large to load whole: the engine's model, block by block, which the export check
        # compared with the artifact over the largest prefix of blocks that fits.
        deployed = result.model
        measured_on = (
            "the engine's model, one block at a time (the artifact was checked against it)"
        )
    del calibration, resources
    gc.collect()

    context.progress(export_index + 1, 0, 1, "measuring the compressed model", force=True)
    compressed = evaluator.measure(deployed, folder=draft.path, on_step=context.check)
    compressed["runtime"] = getattr(deployed, "slimformer_runtime", None)
    compressed["measured_on"] = measured_on
    del deployed
    context.log("compressed model measured", {"compressed": compressed}, type="metric")
    for name, measured in (("original", baseline), ("compressed", compressed)):
        if measured.get("latency_noisy"):
            context.log(f"{name} model: {measured['latency_warning']}", level="warning")
    metrics = {
        "baseline": baseline,
        "compressed": compressed,
        "delta": evaluator.delta(baseline, compressed),
        **search_metrics,
        "settings": {
            **evaluator.settings_record(),
            "dataset_id": inputs.evaluation_dataset_id,
            "dataset_sha256": inputs.evaluation_sha,
        },
        "stages": stage_summaries,
        "export_check": check.report,
    }
    if job.targets:
        metrics["targets"] = _targets_report(job.targets, baseline, compressed)
        metrics["targets_met"] = metrics["targets"]["met"]
    files = package(
        draft,
        scratch,
        recipe=chosen_recipe,
        metrics=metrics,
        inputs=inputs.provenance,
        name=artifact_name(inputs.model_row.name, context.job_id),
    )
    return metrics, files


def _targets_report(targets: dict, baseline: dict, compressed: dict) -> dict:
    """Whether each target holds on the reported evaluation (the search chose on another split)."""
    report = {}
    higher_is_better = {"embedding_cosine", "accuracy", "tokens_per_s"}
    for metric, max_drop in (targets.get("max_metric_drop") or {}).items():
        before, after = baseline.get(metric), compressed.get(metric)
        if not isinstance(before, int | float) or not isinstance(after, int | float) or not before:
            report[metric] = {"met": None, "reason": "metric not measured"}
            continue
        drop = (
            (before - after) / abs(before)
            if metric in higher_is_better
            else (after - before) / abs(before)
        )
        report[metric] = {"max_drop": max_drop, "drop": round(drop, 6), "met": drop <= max_drop}
    for metric, floor in (targets.get("min_metric") or {}).items():
        after = compressed.get(metric)
        if not isinstance(after, int | float):
            report[f"min_metric.{metric}"] = {"met": None, "reason": "metric not measured"}
            continue
        met = after >= floor if metric in higher_is_better else after <= floor
        report[f"min_metric.{metric}"] = {"min_metric": floor, "value": after, "met": met}
    return {
        "met": all(item.get("met") for item in report.values()) if report else None,
        "metrics": report,
    }
