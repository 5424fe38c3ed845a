"""What a job runs on, gathered from the database and storage before the engine starts.

The API resolved everything a job names at submission (model, recipe, calibration and evaluation
datasets, defaults included) and stored it on the job row -- except the default evaluation dataset
of a job submitted while its model was still validating (its task was not known yet), which is
looked up here with the same query (`app.datasets.repository`); this module only fetches: the model's
files on local disk (validated first if its validation message is still queued behind us), the
datasets' records (cached by sha256), the compute device, the preflight memory check, and the
block checkpoints the stages may resume from. It makes no decisions the API already made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.datasets.repository import default_dataset_id
from app.db.session import session_scope
from app.db.tables import Dataset, Job, Model
from app.settings import get_settings
from app.storage import get_store
from workers.attempt import JobFailure
from workers.checkpoints import StorageBlockCheckpoint, fingerprint
from workers.compression.examples import BUILTIN_MODELS
from workers.compression.preflight import estimate_disk, estimate_memory
from workers.compression.recipe import DistillConfig, Recipe
from workers.compression.records import read_records
from workers.model_files import ModelUnavailable, materialize, validate_model
from workers.outage import ride_out

T = TypeVar("T")


@dataclass
class JobInputs:
    job: Job
    model_row: Model
    folder: Path  # the model's files on local disk
    evaluation_dataset_id: str
    evaluation_records: list[dict]
    evaluation_sha: str | None
    calibration_records: list[dict] | None
    calibration_sha: str | None

    @property
    def provenance(self) -> dict:
        """What the artifact was made from, as the model card and report.json record it: the
        model (its Hugging Face id as `base_model` and its license where the registry knows them:
        a built-in, or the repository of a hub model) and the data."""
        source = self.model_row.source or {}
        builtin = None
        if source.get("type") == "builtin":
            builtin = BUILTIN_MODELS.get(source.get("name", ""))
        base_model = builtin.hub_id if builtin else source.get("repo")  # a hub model's repo
        return {
            "model_sha256": self.model_row.sha256,
            "model_id": self.model_row.id,
            "model_name": self.model_row.name,
            "base_model": base_model,
            "license": builtin.license if builtin else None,
            "evaluation_dataset_sha256": self.evaluation_sha,
            "calibration_dataset_sha256": self.calibration_sha,
        }

    def calibration_batches(self, tokenizer: Any) -> list | None:
        """The calibration samples as [1, seq_len] ids, or None for a recipe that needs none."""
        if self.calibration_records is None:
            return None
        from workers.compression.data import calibration_batches

        settings = self.job.calibration
        return calibration_batches(
            [record["text"] for record in self.calibration_records],
            tokenizer,
            num_samples=settings["num_samples"],
            seq_len=settings["seq_len"],
            seed=settings["seed"],
        )

    def checkpoints(self, index: int) -> StorageBlockCheckpoint:
        """Stage `index`'s block checkpoints in storage, keyed by what its computation depends on."""
        import torch
        import transformers

        key = fingerprint(
            model={
                "id": self.model_row.id,
                "sha256": self.model_row.sha256,
                "source": self.model_row.source,
            },
            calibration={**(self.job.calibration or {}), "sha256": self.calibration_sha},
            stages=self.job.recipe["stages"][: index + 1],
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
        )
        return StorageBlockCheckpoint(get_store(), f"checkpoints/{key}")


def read_job(job_id: str) -> Job:
    job = ride_out(f"job {job_id}: read", lambda: read_row(Job, job_id))
    assert job is not None
    return job


def read_row(table: type[T], row_id: str) -> T | None:
    """One row by id, detached, in a transaction of its own: what `ride_out` repeats through a
    database blip (every read below is one, so a blip inside a job's first reads costs nothing)."""
    with session_scope() as session:
        row = session.get(table, row_id)
        session.expunge_all()
    return row


def gather(job: Job) -> JobInputs:
    """Everything `job` names, fetched; a model that is not ready or a dataset that is gone fails
    the job with its own error."""
    model_row = ride_out(f"job {job.id}: model", lambda: read_row(Model, job.model_id))
    assert model_row is not None
    model_row, folder = ready_folder(model_row, "model")
    evaluation_dataset_id = evaluation_dataset(job, model_row)
    evaluation_records, evaluation_sha = dataset_records(evaluation_dataset_id)
    calibration_records = calibration_sha = None
    if job.calibration:
        calibration_records, calibration_sha = dataset_records(job.calibration["dataset_id"])
    return JobInputs(
        job=job,
        model_row=model_row,
        folder=folder,
        evaluation_dataset_id=evaluation_dataset_id,
        evaluation_records=evaluation_records,
        evaluation_sha=evaluation_sha,
        calibration_records=calibration_records,
        calibration_sha=calibration_sha,
    )


def evaluation_dataset(job: Job, model_row: Model) -> str:
    """The job's evaluation dataset: the one it names, or the built-in for its model's task when
    it was submitted while the model was validating (the task, so the default, was not known)."""
    evaluation_dataset_id = (job.evaluation or {}).get("dataset_id")
    if evaluation_dataset_id is None:

        def default() -> str | None:
            with session_scope() as session:
                return default_dataset_id(
                    session=session, task=model_row.task, purpose="evaluation"
                )

        evaluation_dataset_id = ride_out(f"job {job.id}: default evaluation dataset", default)
        if evaluation_dataset_id is None:
            raise JobFailure(
                "invalid_request",
                f"no evaluation dataset given and no built-in one for {model_row.task}",
            )
    return evaluation_dataset_id


def ready_folder(row: Model, what: str) -> tuple[Model, Path]:
    """The model's files on local disk, once it is validated (the row as it is then, and the
    folder); a model that is not ready fails the job with its own error."""
    row = ready_row(row, what)
    try:
        return row, materialize(row)
    except ModelUnavailable as exc:
        raise JobFailure(exc.code, exc.message) from exc


def ready_row(row: Model, what: str) -> Model:
    """The model's row once it is validated; a model that is not ready fails the job with its
    own error."""
    if row.status == "validating":
        model_id = row.id
        validate_model(model_id)  # the validation message may still be queued behind us
        row = ride_out(f"model {model_id}: read", lambda: read_row(Model, model_id))
    if row.status != "ready":
        error = row.error or {}
        raise JobFailure(
            error.get("code", "unsupported_model"),
            f"{what} {row.id} is {row.status}: {error.get('message', '')}",
        )
    return row


def dataset_records(dataset_id: str) -> tuple[list[dict], str | None]:
    """A dataset's records (its file fetched once into the cache, named by its sha256)."""
    dataset = ride_out(f"dataset {dataset_id}: read", lambda: read_row(Dataset, dataset_id))
    if dataset is None or dataset.storage_key is None or dataset.deleted_at is not None:
        raise JobFailure("not_found", f"dataset {dataset_id} is gone")
    local = (
        get_settings().cache_dir / "datasets" / f"{dataset.id}-{dataset.sha256}.{dataset.format}"
    )
    if not local.is_file():
        get_store().fetch(dataset.storage_key, local)
    return read_records(local, dataset.format), dataset.sha256


def load_student(model_id: str, teacher: Any, device: Any) -> Any:
    """Another registered model, as a distillation student: ready, safe, same tokenizer."""
    from workers.compression.loading import load_model

    row = ride_out(f"model {model_id}: read", lambda: read_row(Model, model_id))
    if row is None or row.deleted_at is not None:
        raise JobFailure("not_found", f"the student model {model_id} is gone")
    _, folder = ready_folder(row, "student model")
    student = load_model(folder, device=device)
    if student.task != teacher.task:
        raise JobFailure(
            "invalid_request",
            f"the student {model_id} is a {student.task} model, the teacher a {teacher.task}",
        )
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise JobFailure(
            "invalid_request",
            f"the student {model_id} has another tokenizer than the teacher: distillation "
            "compares their outputs token by token, so the vocabularies must be the same",
        )
    return student


def memory_estimate(inputs: JobInputs, device: Any, *, streamed: bool) -> Any:
    """What the job needs at its peak on `device` (`preflight.estimate_memory`), or None when the
    model's size is not known."""
    model_row, job = inputs.model_row, inputs.job
    if not model_row.parameters:
        return None
    calibration = job.calibration or {}
    recipe = Recipe.model_validate(job.recipe)
    return estimate_memory(
        parameters=model_row.parameters,
        linear_shapes=(model_row.details or {}).get("linear_shapes") or {},
        calibration_samples=calibration.get("num_samples", 0),
        calibration_seq_len=calibration.get("seq_len", 0),
        evaluation_seq_len=(job.evaluation or {}).get("seq_len", 512),
        device=str(device),
        training_tokens=max(
            (
                (stage.micro_batch_size or stage.batch_size) * stage.seq_len
                for stage in recipe.stages
                if isinstance(stage, DistillConfig)
            ),
            default=0,
        ),
        streamed=streamed,
        hessians=any(stage.collects_hessians for stage in recipe.stages),
        stored_bytes_per_parameter=_stored_bytes_per_parameter(model_row),
    )


def streams(recipe: Any, inputs: JobInputs, device: Any) -> bool:
    """Whether the job runs its model streamed, one block resident (`compression.streaming`):
    when every stage can and the whole model would not fit (setting `streaming`: auto), or as the
    setting says (always / never)."""
    if not all(stage.streams for stage in recipe.stages):
        return False
    mode = get_settings().streaming
    if mode != "auto":
        return mode == "always"
    whole = memory_estimate(inputs, device, streamed=False)
    return whole is not None and not whole.fits


def preflight(
    inputs: JobInputs, device: Any, *, streamed: bool = False, scratch: Path | None = None
) -> None:
    """Refuse a job that cannot fit, before loading it (when the model's size is known): in
    memory (a streamed job needs one block resident, so it is refused only when one block does
    not fit), and on the disk of its `scratch` folder."""
    if scratch is not None:
        disk_preflight(inputs, scratch, streamed=streamed)
    estimate = memory_estimate(inputs, device, streamed=streamed)
    if estimate is None or estimate.fits:
        return
    advice = (
        "a single block of this model with its calibration activations does not fit"
        if streamed
        else "use fewer calibration samples or a shorter seq_len"
    )
    raise JobFailure(
        "insufficient_memory",
        f"this job needs about {estimate.peak_bytes / 1e9:.1f} GB on {device} but "
        f"{estimate.available_bytes / 1e9:.1f} GB is free ({estimate.breakdown}); {advice}, "
        "or use a worker with more memory",
    )


def disk_preflight(inputs: JobInputs, scratch: Path, *, streamed: bool) -> None:
    """Refuse a job whose scratch files (a streamed model's changed blocks, the export and its
    archive: `preflight.estimate_disk`) would not fit on the disk of `scratch`."""
    model_row = inputs.model_row
    if not model_row.parameters:
        return
    details = model_row.details or {}
    estimate = estimate_disk(
        parameters=model_row.parameters,
        linear_shapes=details.get("linear_shapes") or {},
        stages=Recipe.model_validate(inputs.job.recipe).stages,
        folder=scratch,
        streamed=streamed,
        stored_bytes_per_parameter=_stored_bytes_per_parameter(model_row),
    )
    if estimate.fits:
        return
    parts = ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in estimate.breakdown.items())
    raise JobFailure(
        "insufficient_disk",
        f"this job writes about {estimate.needed_bytes / 1e9:.2f} GB under {scratch.parent} "
        f"({parts}) but {estimate.free_bytes / 1e9:.2f} GB is free there; free disk space, "
        "point SLIMFORMER_DATA_DIR at a larger disk, or use a worker with more disk",
    )


def _stored_bytes_per_parameter(model_row: Any) -> float:
    """What the checkpoint stores per parameter (2 for bf16), from the model's inspected details;
    float32's 4 when they do not say."""
    return (model_row.details or {}).get("weight_bytes", 0) / model_row.parameters or 4
