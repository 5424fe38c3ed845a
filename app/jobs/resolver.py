"""A job request resolved: every default filled and every id it names checked, at submission.

What `resolve_job` returns is what the job row stores and the worker reads; the worker looks
nothing up again (which model, which built-in text). Where a choice depends on the method, the
stage's own facts decide (`needs_calibration`, `referenced_ids()` on the stage configs of
`workers.compression.recipe`), not a table of method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.datasets import repository as datasets
from app.db.tables import Dataset, Model
from app.db.visibility import did_you_mean
from app.errors import APIError
from app.jobs.routing import DeviceConflict, resolve_device
from app.jobs.schemas import CalibrationSpec, JobCreate
from app.models import repository as models
from app.settings import get_settings
from workers.compression.recipe import (  # validation specs only
    Recipe,
    StageConfig,
    default_metrics,
    group_size_conflicts,
    shapes_after,
)


@dataclass(frozen=True)
class ResolvedJob:
    model: Model
    recipe: dict[str, Any]  # every stage with its defaults, its training text named
    calibration: dict[str, Any] | None  # None: no stage calibrates and none was asked for
    # `dataset_id` and `metrics` are resolved; None only while the model's task is unknown (it is
    # still being validated), when no default can be chosen yet.
    evaluation: dict[str, Any]
    targets: dict[str, Any] | None
    export: dict[str, Any]
    device: str  # cpu | gpu | any: `resources.device` narrowed by what the stages run on
    metadata: dict[str, str]
    priority: int
    cache: bool
    max_runtime_s: int
    max_attempts: int


def resolve_job(*, session: Session, project_id: str, spec: JobCreate) -> ResolvedJob:
    """Raises the APIError the request deserves (404 unknown id, 409 unusable one, 422 a recipe
    that cannot apply); checks run in the order of the request's fields."""
    model = _job_model(session, project_id, spec.model_id)
    if spec.recipe is None:
        if spec.targets is None:
            raise APIError(
                "invalid_request",
                "recipe is required unless targets are given (a search then starts from the "
                "default space for the model's task)",
                param="recipe",
            )
        spec = _with_default_recipe(spec, model)
    device = _device(spec)
    _check_recipe_against_shapes(spec.recipe, (model.details or {}).get("linear_shapes"))
    evaluation = spec.evaluation.model_dump(mode="json")
    if evaluation["dataset_id"] is None and model.task is not None:
        evaluation["dataset_id"] = _builtin(
            session, model.task, "evaluation", "evaluation.dataset_id"
        )
    if evaluation["metrics"] is None and model.task is not None:
        evaluation["metrics"] = default_metrics(model.task)  # echoed as the job will measure
    if spec.targets is not None and model.task is not None:
        evaluation["metrics"] = _check_targets(spec, model.task, evaluation["metrics"])
    calibration = _calibration(session, spec, model)
    recipe = spec.recipe.model_copy(deep=True)  # the request stays as it came
    datasets_named = [
        ("calibration.dataset_id", (calibration or {}).get("dataset_id")),
        ("evaluation.dataset_id", evaluation["dataset_id"]),
    ]
    for index, stage in enumerate(recipe.stages):
        datasets_named += _resolve_stage(session, project_id, model, stage, index)
    for param, dataset_id in datasets_named:
        if dataset_id is not None:
            _check_dataset(session, project_id, dataset_id, param)
    settings = get_settings()
    return ResolvedJob(
        model=model,
        recipe=recipe.model_dump(mode="json"),
        calibration=calibration,
        evaluation=evaluation,
        targets=spec.targets.model_dump(mode="json") if spec.targets is not None else None,
        export=spec.export.model_dump(mode="json"),
        device=device,
        metadata=dict(spec.metadata),
        priority=spec.priority,
        cache=spec.cache,
        max_runtime_s=spec.max_runtime_s or settings.default_max_runtime_s,
        max_attempts=spec.max_attempts or settings.default_max_attempts,
    )


def _check_targets(spec: JobCreate, task: str, metrics: list[str]) -> list[str]:
    """422 for a target the model's task cannot measure; the evaluation's metrics with every
    targeted metric added (the result is checked against the targets on the reported split)."""
    from workers.compression.search.targets import TASK_METRICS

    fits = TASK_METRICS.get(task, frozenset())
    for field in ("max_metric_drop", "min_metric"):
        for metric in getattr(spec.targets, field):
            if metric not in fits:
                raise APIError(
                    "invalid_request",
                    f"a {task} model is not measured by {metric}; targets may name "
                    f"{', '.join(sorted(fits)) or 'nothing'}",
                    param=f"targets.{field}.{metric}",
                )
    wanted = list(spec.targets.max_metric_drop) + list(spec.targets.min_metric)
    if spec.targets.objective == "latency":
        wanted.append("latency")
    return list(metrics) + [m for m in dict.fromkeys(wanted) if m not in metrics]


def _with_default_recipe(spec: JobCreate, model: Model) -> JobCreate:
    """The request with the default space's starting recipe for the model's task and the job's
    device, its group size fitted to the model's widths where they are known."""
    from workers.compression.search.defaults import default_recipe

    recipe = default_recipe(
        model.task, spec.resources.device, (model.details or {}).get("linear_shapes")
    )
    return spec.model_copy(update={"recipe": recipe})


def _job_model(session: Session, project_id: str, model_id: str) -> Model:
    model = models.get_visible(session=session, project_id=project_id, model_id=model_id)
    if model is None:
        hint = did_you_mean(session, Model, project_id, model_id)
        raise APIError("not_found", f"No model with id {model_id!r}.{hint}", param="model_id")
    if model.status == "rejected":
        raise APIError(
            "conflict",
            f"Model {model.id} was rejected: {(model.error or {}).get('message', 'see the model')}",
            param="model_id",
        )
    return model


def _device(spec: JobCreate) -> str:
    """A stage whose kernels exist on one device class only (`runs_on`) decides `any`, and
    refuses the other class."""
    stage = next((stage for stage in spec.recipe.stages if stage.runs_on), None)
    try:
        return resolve_device(
            spec.resources.device,
            stage.runs_on if stage else None,
            method=stage.method if stage else "this recipe",
        )
    except DeviceConflict as exc:
        raise APIError("invalid_request", str(exc), param="resources.device") from exc


def _calibration(session: Session, spec: JobCreate, model: Model) -> dict[str, Any] | None:
    if spec.calibration is None and not spec.recipe.needs_calibration:
        return None
    calibration = (spec.calibration or CalibrationSpec()).model_dump(mode="json")
    if calibration["dataset_id"] is None:
        if model.task is None:
            raise APIError(
                "invalid_request",
                "This recipe needs calibration data: give calibration.dataset_id",
                param="calibration.dataset_id",
            )
        calibration["dataset_id"] = _builtin(
            session, model.task, "calibration", "calibration.dataset_id"
        )
    return calibration


def _resolve_stage(
    session: Session, project_id: str, model: Model, stage: StageConfig, index: int
) -> list[tuple[str, str]]:
    """Fills the stage's training text where it takes one and was given none, checks the models
    it references; returns the (param, id) of the datasets it references, checked later with the
    job's own."""
    where = f"recipe.stages[{index}]"
    if "dataset_id" in type(stage).model_fields and stage.dataset_id is None:
        if model.task is not None:
            # Resolved now, so the job (and its resume fingerprint) names the text it trains on.
            stage.dataset_id = datasets.default_dataset_id(
                session=session, task=model.task, purpose="calibration"
            )
        if stage.dataset_id is None:
            raise APIError(
                "invalid_request",
                f"{stage.method} trains on text: give its dataset_id",
                param=f"{where}.dataset_id",
            )
    dumped = stage.model_dump(mode="json")
    references = stage.referenced_ids()
    for student_id in references["model_ids"]:
        _check_student(session, project_id, model, student_id, _param(where, dumped, student_id))
    return [(_param(where, dumped, found), found) for found in references["dataset_ids"]]


def _check_student(
    session: Session, project_id: str, teacher: Model, student_id: str, param: str
) -> None:
    student = models.get_visible(session=session, project_id=project_id, model_id=student_id)
    if student is None:
        hint = did_you_mean(session, Model, project_id, student_id)
        raise APIError("not_found", f"No model with id {student_id!r}.{hint}", param=param)
    if student.status == "rejected":
        raise APIError(
            "conflict", f"Model {student.id} was rejected and cannot be a student", param=param
        )
    if teacher.task is not None and student.task not in (None, teacher.task):
        raise APIError(
            "invalid_request",
            f"the student {student.id} is a {student.task} model and the teacher a "
            f"{teacher.task}: distillation needs the same kind of model",
            param=param,
        )


def _check_dataset(session: Session, project_id: str, dataset_id: str, param: str) -> None:
    dataset = datasets.get_visible(session=session, project_id=project_id, dataset_id=dataset_id)
    if dataset is None:
        hint = did_you_mean(session, Dataset, project_id, dataset_id)
        raise APIError("not_found", f"No dataset with id {dataset_id!r}.{hint}", param=param)
    if dataset.status != "ready":
        raise APIError("conflict", f"Dataset {dataset_id} is {dataset.status}", param=param)


def _builtin(session: Session, task: str, purpose: datasets.Purpose, param: str) -> str:
    dataset_id = datasets.default_dataset_id(session=session, task=task, purpose=purpose)
    if dataset_id is None:
        name = datasets.default_builtin_name(task=task, purpose=purpose)
        raise APIError(
            "not_found",
            f"No {purpose} dataset given and no built-in {name!r} on this install (the examples "
            f"extra): give {param}",
            param=param,
        )
    return dataset_id


def _param(where: str, stage: dict[str, Any], value: str) -> str:
    """The field path of a referenced id inside the stage (`recipe.stages[1].student.model_id`),
    for the error's `param`."""

    def path_to(node: Any) -> list[str] | None:
        if node == value:
            return []
        children = node.items() if isinstance(node, dict) else ()
        for key, child in children:
            below = path_to(child)
            if below is not None:
                return [key, *below]
        return None

    return ".".join([where, *(path_to(stage) or [])])


def _check_recipe_against_shapes(recipe: Recipe, linear_shapes: dict | None) -> None:
    """The model's shapes are known at submission: refuse a recipe that cannot apply to them."""
    if not linear_shapes:
        return
    for index, stage in enumerate(recipe.stages):
        if stage.referenced_ids()["model_ids"]:
            break  # later stages work on that model (a student), whose shapes are its own
        conflicts = group_size_conflicts(stage, linear_shapes)
        linear_shapes = shapes_after(stage, linear_shapes)  # what the next stage sees
        if conflicts:
            widths = sorted({linear_shapes[name][1] for name in conflicts})
            shown = ", ".join(conflicts[:4]) + (
                f" and {len(conflicts) - 4} more" if len(conflicts) > 4 else ""
            )
            raise APIError(
                "invalid_request",
                f"group_size {stage.group_size} does not divide the input width "
                f"({', '.join(map(str, widths))}) of {shown}; choose a divisor, -1 for per "
                "channel, or leave those layers out with `ignore`",
                param=f"recipe.stages[{index}].group_size",
            )
