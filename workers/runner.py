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

from app.jobs.routing import device_class
from workers import baseline_cache
from workers.attempt import JobContext, run_attempt
from workers.compression.runtimes import where_it_runs
from workers.job_inputs import (
    dataset_records,
    gather,
    load_student,
    preflight,
    read_job,
    streams,
)
from workers.packaging import MIB, artifact_name, package, write_export
from workers.progress_plan import Phase, ProgressPlan
from workers.result_cache import fingerprint, reuse_if_cached

QUALITY = ("perplexity", "embedding_cosine", "accuracy")
# Rough sizes of the phases that send no tokens through a model, in the plan's unit (about a
# thousand tokens through the model): they only matter until the job's own pace is observed.
LOAD_WEIGHT = 2.0
EXPORT_WEIGHT = 2.0
# Packing compresses every byte (gzip level 9): measured on a 2-core CPU, about 4 MiB in the time
# MiniLM takes for a thousand tokens. Priced first at the original model's size, then at the
# export's once it is written.
MIB_PER_WEIGHT = 4.0


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
    phases = JobPhases(methods)
    context.plan = phases.plan
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
    preflight(inputs, device, streamed=streamed, scratch=scratch)
    torch.manual_seed(0)
    loaded = load_model(inputs.folder, device=device, streamed=streamed, scratch=scratch / "blocks")
    evaluation = {k: v for k, v in (job.evaluation or {}).items() if k != "dataset_id"}
    evaluator = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=EvaluationSettings.model_validate(evaluation),
        records=inputs.evaluation_records,
        device=device,
    )
    baseline_key = baseline_cache.baseline_inputs(
        model_sha256=inputs.model_row.sha256,
        evaluator=evaluator,
        dataset_sha256=inputs.evaluation_sha,
        device_class=device_class(str(device)),
        streamed=streamed,
    )
    cacheable = bool(job.cache and inputs.model_row.sha256 and inputs.evaluation_sha)
    baseline_fingerprint = fingerprint(baseline_key)
    cached = (
        baseline_cache.lookup(project_id=context.project_id, key=baseline_fingerprint)
        if cacheable
        else None
    )
    context.plan.reweigh(
        phases.weights(
            recipe,
            job,
            evaluator,
            baseline_cached=cached is not None,
            model_bytes=_folder_bytes(inputs.folder),
        )
    )

    how = "one block at a time, the rest on disk" if streamed else "whole"
    context.progress(0, 1, 3, f"loaded {loaded.architecture} on {device} ({how})", force=True)
    calibration = inputs.calibration_batches(loaded.tokenizer)
    context.progress(0, 3, 3, "data ready", force=True)

    def measuring(index: int, what: str):
        def report(done: int, total: int, detail: str) -> None:
            # Throttled, except the last pass: every measurement shows up finished.
            context.progress(index, done, total, what, force=done == total, detail=detail)

        return report

    baseline_phase = phases.index("baseline")
    if cached is None:
        context.progress(baseline_phase, 0, 1, "measuring the original model", force=True)
        baseline = evaluator.measure(
            loaded.model,
            folder=inputs.folder,
            on_step=context.check,
            on_progress=measuring(baseline_phase, "measuring the original model"),
        )
        if cacheable:
            baseline_cache.remember(
                project_id=context.project_id,
                key=baseline_fingerprint,
                inputs=baseline_key,
                job_id=context.job_id,
                metrics=baseline,
                state=evaluator.baseline_state(),
            )
        baseline["cached"] = False
        context.log("baseline measured", {"baseline": baseline}, type="metric")
    else:
        # The same model measured the same way before: only its latency is measured again,
        # here, beside the compressed model's.
        evaluator.restore_baseline_state(cached.state)
        message = f"measuring the original model's latency (the rest measured by {cached.job_id})"
        context.progress(baseline_phase, 0, 1, message, force=True)
        latency = evaluator.measure(
            loaded.model,
            folder=inputs.folder,
            on_step=context.check,
            only=("latency",),
            on_progress=measuring(baseline_phase, message),
        )
        baseline = {**cached.metrics, **latency, "cached": True, "cached_from": cached.job_id}
        context.log(
            f"baseline reused from {cached.job_id} (same model, evaluation settings, data, "
            "device class and versions); latency measured again",
            {"baseline": baseline},
            type="metric",
        )

    def on_progress(update: Any) -> None:
        # Throttled, except a stage's last step: every stage shows up finished in the events.
        context.progress(
            phases.index("stage", update.stage_index),
            update.step,
            update.total_steps,
            update.message,
            force=update.step == update.total_steps,
            data=update.data,
            detail=f"{update.unit} {update.step}/{update.total_steps}",
        )

    students: dict[int, Any] = {}  # id(model) -> LoadedModel of a distillation student

    def student_model(model_id: str) -> Any:
        student = load_student(model_id, loaded, device)
        students[id(student.model)] = student
        return student.model

    def measure_stage(index: int, model: Any) -> dict:
        # A pipeline reports what each stage cost and bought: quality after every stage.
        phase = phases.index("measure", index)
        message = f"measuring the model after {methods[index]}"
        context.progress(phase, 0, 1, message, force=True)
        measured = evaluator.measure(
            model,
            folder=None,
            on_step=context.check,
            only=QUALITY,
            on_progress=measuring(phase, message),
        )
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

    export_index = phases.index("export")
    context.progress(export_index, 0, 1, "writing the compressed model", force=True)
    written = {"total": 1}

    def writing(done: int, total: int, detail: str) -> None:
        written["total"] = total  # the load test after the writing is one more step
        context.progress(
            export_index, done, total + 1, "writing the compressed model", detail=detail
        )

    draft = write_export(
        loaded,
        result.model,
        scratch,
        recipe=chosen_recipe,
        inputs=inputs.provenance,
        progress=writing,
    )
    sample = loaded.tokenizer(
        inputs.evaluation_records[0]["text"], return_tensors="pt", truncation=True, max_length=64
    )["input_ids"]
    steps = written["total"]
    context.progress(
        export_index, steps, steps + 1, "load-testing the export", force=True, detail="load test"
    )
    check = verify(draft, result.model, loaded.task, sample)
    context.plan.reweigh(phases.with_package_of(_folder_bytes(draft.path)))
    context.progress(export_index, steps + 1, steps + 1, "export load-tested", force=True)
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

    evaluate_index = phases.index("evaluate")
    context.progress(evaluate_index, 0, 1, "measuring the compressed model", force=True)
    compressed = evaluator.measure(
        deployed,
        folder=draft.path,
        on_step=context.check,
        on_progress=measuring(evaluate_index, "measuring the compressed model"),
    )
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
        "where_it_runs": where_it_runs(draft.config.get("quantization_config")),
    }
    if job.targets:
        metrics["targets"] = _targets_report(job.targets, baseline, compressed)
        metrics["targets_met"] = metrics["targets"]["met"]
    package_index = phases.index("package")

    def packing(done: int, total: int, detail: str) -> None:
        context.progress(package_index, done, total, "packing the artifact", detail=detail)

    context.progress(package_index, 0, 1, "packing the artifact", force=True)
    files = package(
        draft,
        scratch,
        recipe=chosen_recipe,
        metrics=metrics,
        inputs=inputs.provenance,
        name=artifact_name(inputs.model_row.name, context.job_id),
        progress=packing,
    )
    return metrics, files


class JobPhases:
    """The phases of a job, in the order `execute` runs them, for its progress plan: load, measure
    the original, each recipe stage (and the measurement after it, but the last), export,
    measure the result, package. Named for people: "stage 1 of 2 · gptq"."""

    def __init__(self, methods: list[str]) -> None:
        self.methods = methods
        count = len(methods)
        phases = [
            ("load", Phase("load", "loading the model", 1.0)),
            ("baseline", Phase("baseline", "measuring the original", 1.0)),
        ]
        for i, method in enumerate(methods):
            stage = f"stage {i + 1} of {count} · {method}"
            phases.append((("stage", i), Phase(method, stage, 1.0, recipe_stage=i)))
            if i < count - 1:
                measure = Phase(method, f"{stage} · measuring", 1.0, recipe_stage=i)
                phases.append((("measure", i), measure))
        phases += [
            ("export", Phase("export", "writing the compressed model", 1.0)),
            ("evaluate", Phase("evaluate", "measuring the compressed model", 1.0)),
            ("package", Phase("package", "packing the artifact", 1.0)),
        ]
        self.keys = [key for key, _ in phases]
        self.plan = ProgressPlan([phase for _, phase in phases])

    def index(self, name: str, stage: int | None = None) -> int:
        return self.keys.index(name if stage is None else (name, stage))

    def weights(
        self, recipe: Any, job: Any, evaluator: Any, *, baseline_cached: bool, model_bytes: int
    ) -> list:
        """Each phase's rough size in thousands of tokens through the model (see LOAD_WEIGHT)."""
        full = evaluator.work_tokens() / 1000
        baseline = evaluator.work_tokens(("latency",)) / 1000 if baseline_cached else full
        quality = evaluator.work_tokens(QUALITY) / 1000
        calibration = job.calibration or {}
        sized = {"load": LOAD_WEIGHT, "baseline": baseline, "export": EXPORT_WEIGHT}
        sized.update({"evaluate": full, "package": model_bytes / MIB / MIB_PER_WEIGHT})
        weights = []
        for key in self.keys:
            if isinstance(key, str):
                weights.append(sized[key])
            elif key[0] == "measure":
                weights.append(quality)
            else:
                weights.append(_stage_weight(recipe.stages[key[1]], calibration))
        return [max(weight, 0.1) for weight in weights]

    def with_package_of(self, size_bytes: int) -> list:
        """The plan's weights with packing priced at `size_bytes`."""
        weights = [phase.weight for phase in self.plan.phases]
        weights[self.index("package")] = max(size_bytes / MIB / MIB_PER_WEIGHT, 0.1)
        return weights


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _stage_weight(stage: Any, calibration: dict) -> float:
    """A calibration-based stage runs its samples through every block about twice (inputs, then
    outputs of the changed block); a training stage runs forward and backward over its steps'
    tokens; the others touch weights only."""
    if stage.method == "distill":
        return 3 * stage.steps * stage.batch_size * stage.seq_len / 1000
    if stage.needs_calibration:
        return 2 * calibration.get("num_samples", 128) * calibration.get("seq_len", 512) / 1000
    return 1.0


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
