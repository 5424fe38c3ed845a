"""The people-facing commands (`submit`, `jobs`, `download`, `cancel`).

They are built on the SDK (`slimformer.client`), so they behave the same against `slimformer serve`
on a laptop and against a remote deployment, with its retries, resumed event streams and verified
downloads. Nothing here imports the service: what the CLI knows about jobs is what the API contract
says, nothing more. What it shows is drawn by `slimformer.display`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import click

from slimformer.client import (
    DEFAULT_URL,
    Client,
    SlimformerError,
    safe_filename,
)
from slimformer.display import (
    DownloadBar,
    ProgressView,
    artifacts_table,
    describe_recipe,
    format_duration,
    format_table,
    is_number,
    metrics_table,
    progress_cell,
    short_time,
)

ID_PREFIXES = {"models": "mdl_", "datasets": "dset_"}


class CommandError(SlimformerError):
    """A failure the user should read as `code: message` (exit status 2)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


def resolve_id(client: Client, collection: str, name_or_id: str) -> str:
    """`mdl_…`/`dset_…` pass through; anything else is looked up by name in the listing. Names need
    not be unique: of several matches, the single `ready` one wins, otherwise the user must pick."""
    prefix = ID_PREFIXES[collection]
    if name_or_id.startswith(prefix):
        return name_or_id
    try:
        return getattr(client, collection).find(name_or_id).id
    except SlimformerError as exc:
        if exc.code == "not_found" and exc.status is None:
            kind = collection.rstrip("s")
            raise CommandError(
                "not_found", f"no {kind} named {name_or_id!r} (nor a {prefix}… id)"
            ) from None
        raise


def follow_job(
    client: Client,
    job_id: str,
    on_event: Callable[[dict[str, Any]], None],
    *,
    reconnect_delay_s: float = 1.0,
) -> dict[str, Any]:
    """Feed the job's events (as dicts) to `on_event` until the job is terminal; return the final
    job. `Client.jobs.events` resumes a dropped stream, so no event is seen twice or missed."""
    for event in client.jobs.events(job_id, reconnect_delay_s=reconnect_delay_s):
        on_event(event.to_dict())
    return client.jobs.get(job_id).to_dict()


# --- Building a job -----------------------------------------------------------------------------


def parse_stage(spec: str) -> dict[str, Any]:
    """`gptq` or `gptq:bits=4,group_size=128`; values are read as JSON scalars where they parse."""
    method, _, options = spec.partition(":")
    if not method:
        raise click.BadParameter(f"{spec!r}: expected METHOD or METHOD:key=value,…")
    stage: dict[str, Any] = {"method": method}
    for option in filter(None, options.split(",")):
        key, equals, raw = option.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"{option!r} in {spec!r}: expected key=value")
        stage[key] = _scalar(raw)
    return stage


def _scalar(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_metadata(pairs: Iterable[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="--metadata")
        metadata[key] = value
    return metadata


def build_job_body(
    *,
    model_id: str,
    template: dict[str, Any] | None = None,
    stages: list[dict[str, Any]] = (),
    calibration_id: str | None = None,
    evaluation_id: str | None = None,
    metrics: Iterable[str] = (),
    metadata: dict[str, str] | None = None,
    calibration_settings: dict[str, int | None] | None = None,
    evaluation_settings: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """The `POST /v1/jobs` body: the recipe file's fields, overridden by the command line."""
    body = json.loads(json.dumps(template or {}))  # a deep copy
    body["model_id"] = model_id
    if stages:
        if body.get("recipe", {}).get("stages"):
            raise click.UsageError("give the stages either in --recipe or as --method, not both")
        body["recipe"] = {**body.get("recipe", {}), "stages": list(stages)}
    if calibration_id:
        body["calibration"] = {**(body.get("calibration") or {}), "dataset_id": calibration_id}
    metrics = list(metrics)
    if evaluation_id or metrics:
        evaluation = dict(body.get("evaluation") or {})
        if evaluation_id:
            evaluation["dataset_id"] = evaluation_id
        if metrics:
            evaluation["metrics"] = metrics
        body["evaluation"] = evaluation
    for field, given in (
        ("calibration", calibration_settings),
        ("evaluation", evaluation_settings),
    ):
        given = {key: value for key, value in (given or {}).items() if value is not None}
        if given:
            body[field] = {**(body.get(field) or {}), **given}
    if metadata:
        body["metadata"] = {**(body.get("metadata") or {}), **metadata}
    return body


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A recipe (`{"stages": […]}`) or a whole job body (`{"recipe": …, "calibration": …}`)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--recipe") from exc
    if isinstance(document, dict) and "stages" in document:
        return {"recipe": document}
    if isinstance(document, dict) and "recipe" in document:
        return document
    raise click.BadParameter(
        f'{path}: expected {{"stages": [...]}} or a job body with "recipe"', param_hint="--recipe"
    )


# --- Downloads ----------------------------------------------------------------------------------


def local_filename(artifact: dict) -> str | None:
    """The name a job's artifact is saved under: the server's, which names the model and the job;
    an artifact from before it did (`model.tar.gz`) gets its job's id in front, so that the
    downloads of two jobs never overwrite each other."""
    name = safe_filename(artifact.get("filename"))
    job_id = safe_filename(artifact.get("job_id"))
    if name and job_id and job_id not in name:
        return f"{job_id}-{name}"
    return name


def download_artifact(
    client: Client,
    artifact_id: str,
    directory: Path,
    *,
    expected_sha256: str | None = None,
    filename: str | None = None,
    show_progress: bool = True,
) -> Path:
    """`Client.download` into `directory` (made if missing) with a progress bar on stderr."""
    directory.mkdir(parents=True, exist_ok=True)
    bar = DownloadBar(filename or artifact_id, enabled=show_progress)
    try:
        return client.download(
            artifact_id,
            directory,
            expected_sha256=expected_sha256,
            filename=filename,
            progress=bar,
        )
    finally:
        bar.close()


class UnsafeArchive(CommandError):
    def __init__(self, message: str) -> None:
        super().__init__("unsafe_archive", message)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def check_member_name(name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"absolute member path {name!r}")
    if ".." in path.parts:
        raise UnsafeArchive(f"member path leaves the folder: {name!r}")


def safe_extract(archive: Path, destination: Path) -> Path:
    """Unpack a .tar.gz/.tar/.zip into the new folder `destination`, refusing absolute paths, `..`
    and anything but regular files and folders (links, devices) before writing a single byte.
    An archive holding one folder (a model artifact holds `model/`) becomes that folder, renamed,
    never `destination/model/`. Permissions follow the umask, as a folder made here would."""
    if destination.exists():
        raise CommandError("conflict", f"{destination} already exists; remove it or use -o")
    destination.parent.mkdir(parents=True, exist_ok=True)
    mask = current_umask()
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=destination.parent))
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    check_member_name(info.filename)
                    mode = info.external_attr >> 16
                    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise UnsafeArchive(f"{info.filename!r} is not a regular file")
                bundle.extractall(staging)
        else:
            with tarfile.open(archive) as bundle:
                members = bundle.getmembers()
                for member in members:
                    check_member_name(member.name)
                    if not (member.isfile() or member.isdir()):
                        raise UnsafeArchive(f"{member.name!r} is a link or special file")
                bundle.extractall(staging, members=members, filter=masked_data_filter(mask))
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        root.chmod(0o777 & ~mask)  # mkdtemp makes the staging folder private (0700)
        os.replace(root, destination)
    except (tarfile.TarError, zipfile.BadZipFile) as exc:
        raise CommandError("bad_archive", f"{archive}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already, unless a folder came out of it
    return destination


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def masked_data_filter(mask: int) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo]:
    """tarfile's `data` filter (no links, devices or paths outside; no setuid or group/other
    write bits), with the umask applied to the archive's modes as `tar` applies it."""

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        member = tarfile.data_filter(member, path)
        if member.mode is not None:
            member = member.replace(mode=member.mode & ~mask, deep=False)
        return member

    return keep


def extraction_folder(archive: Path) -> Path:
    for suffix in ARCHIVE_SUFFIXES:
        if archive.name.endswith(suffix):
            return archive.with_name(archive.name[: -len(suffix)])
    raise CommandError("bad_archive", f"{archive.name}: not a {', '.join(ARCHIVE_SUFFIXES)} file")


# --- Commands -----------------------------------------------------------------------------------


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--api-key",
        envvar="SLIMFORMER_API_KEY",
        show_envvar=True,
        help="API key (not needed when the service runs with auth off)",
    )(command)
    return click.option(
        "--url",
        envvar="SLIMFORMER_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help="Service URL",
    )(command)


@contextmanager
def api_session(url: str, api_key: str | None) -> Iterator[Client]:
    """A `Client` whose failures become `code: message` on stderr and exit status 2."""
    api = Client(url, api_key or "", user_agent="slimformer-cli")
    try:
        yield api
    except SlimformerError as exc:
        message = f"{exc.message} (param: {exc.param})" if exc.param else exc.message
        click.echo(f"{exc.code}: {message}", err=True)
        raise click.exceptions.Exit(2) from None
    finally:
        api.close()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def register_client_commands(group: click.Group) -> None:
    """Add `submit`, `jobs`, `wait`, `download`, `cancel`, `models` and `datasets` to the
    `slimformer` command group."""
    for command in (submit, jobs, wait, download, cancel, models, datasets):
        group.add_command(command)


@click.command()
@click.argument("model")
@click.option(
    "--recipe",
    "recipe_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON: a recipe {"stages": [...]} or a whole job body; options override it',
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    metavar="METHOD[:key=value,…]",
    help="A recipe stage, e.g. dynamic_int8 or rtn:bits=4,group_size=128; "
    "repeat for a pipeline, in order",
)
@click.option("--calibration", metavar="DATASET", help="Calibration dataset (name or dset_ id)")
@click.option("--evaluation", metavar="DATASET", help="Evaluation dataset (name or dset_ id)")
@click.option(
    "--calibration-samples", type=click.IntRange(1), help="Calibration windows [the method's]"
)
@click.option("--calibration-seq-len", type=click.IntRange(8), help="Tokens per calibration window")
@click.option(
    "--eval-samples",
    type=click.IntRange(1),
    help="Evaluation windows (causal LMs) or texts (encoders) to score",
)
@click.option("--eval-seq-len", type=click.IntRange(8), help="Tokens per evaluation window")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="METRIC",
    help="perplexity, embedding_cosine, accuracy, latency or size (repeatable; "
    "default: what fits the model)",
)
@click.option(
    "--metadata",
    "metadata_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Attach metadata (repeatable)",
)
@click.option("--idempotency-key", help="Resubmitting with the same key returns the same job")
@click.option("--wait", is_flag=True, help="Follow the job to its end; exit 1 unless it succeeds")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON")
@connection_options
def submit(
    model: str,
    recipe_file: Path | None,
    methods: tuple[str, ...],
    calibration: str | None,
    evaluation: str | None,
    calibration_samples: int | None,
    calibration_seq_len: int | None,
    eval_samples: int | None,
    eval_seq_len: int | None,
    metrics: tuple[str, ...],
    metadata_pairs: tuple[str, ...],
    idempotency_key: str | None,
    wait: bool,
    as_json: bool,
    url: str,
    api_key: str | None,
) -> None:
    """Compress MODEL (a model name or mdl_ id) as a job; print its id."""
    template = read_recipe_file(recipe_file) if recipe_file else None
    stages = [parse_stage(spec) for spec in methods]
    metadata = parse_metadata(metadata_pairs)
    with api_session(url, api_key) as api:
        body = build_job_body(
            model_id=resolve_id(api, "models", model),
            template=template,
            stages=stages,
            calibration_id=calibration and resolve_id(api, "datasets", calibration),
            evaluation_id=evaluation and resolve_id(api, "datasets", evaluation),
            metrics=metrics,
            metadata=metadata,
            calibration_settings={
                "num_samples": calibration_samples,
                "seq_len": calibration_seq_len,
            },
            evaluation_settings={"max_samples": eval_samples, "seq_len": eval_seq_len},
        )
        job = api.jobs.create(body, idempotency_key=idempotency_key).to_dict()
        if not wait:
            echo_json(job) if as_json else click.echo(job["id"])
            return
        if not as_json:
            click.echo(job["id"])
        final = watch(api, job["id"], as_json)
    if final["status"] != "succeeded":
        raise click.exceptions.Exit(1)


def watch(api: Client, job_id: str, as_json: bool) -> dict[str, Any]:
    """Follow the job with a progress bar to its end, then print the outcome; Ctrl-C stops
    following, not the job."""
    view = ProgressView(enabled=not as_json)
    try:
        final = follow_job(api, job_id, view)
    except KeyboardInterrupt:
        view.close()
        click.echo(
            f"\nstopped following {job_id}; it keeps running "
            f"(`slimformer wait {job_id}` follows it again, `slimformer cancel {job_id}` stops it)",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    finally:
        view.close()
    if as_json:
        echo_json(final)
    else:
        report_outcome(api, final)
    return final


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON")
@connection_options
def wait(job_id: str, as_json: bool, url: str, api_key: str | None) -> None:
    """Follow a job (started elsewhere, or after Ctrl-C) to its end; exit 1 unless it succeeds."""
    with api_session(url, api_key) as api:
        final = watch(api, job_id, as_json)
    if final["status"] != "succeeded":
        raise click.exceptions.Exit(1)


def report_outcome(api: Client, job: dict[str, Any]) -> None:
    click.echo(f"{job['id']} {job['status']}")
    if job.get("error"):
        error = job["error"]
        click.echo(f"{error.get('code')}: {error.get('message')}", err=True)
    if job.get("metrics"):
        click.echo(metrics_table(job["metrics"]))
        if job["metrics"].get("trials"):
            click.echo(f"search trials: {len(job['metrics']['trials'])}")
    if job["status"] == "succeeded":
        artifacts = [a.to_dict() for a in api.artifacts.list(job["id"])]
        click.echo(artifacts_table(artifacts))
        click.echo(f"download with: slimformer download {job['id']}")


@click.group(invoke_without_command=True)
@click.option(
    "--status",
    type=click.Choice(["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]),
)
@click.option("--model", metavar="MODEL", help="Only jobs of this model (name or mdl_ id)")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON")
@connection_options
@click.pass_context
def jobs(
    ctx: click.Context,
    status: str | None,
    model: str | None,
    limit: int,
    as_json: bool,
    url: str,
    api_key: str | None,
) -> None:
    """List jobs, newest first (`jobs show JOB_ID` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    with api_session(url, api_key) as api:
        model_id = resolve_id(api, "models", model) if model else None
        listed = []
        for job in api.jobs.iter(page_size=min(limit, 100), status=status, model_id=model_id):
            listed.append(job.to_dict())
            if len(listed) == limit:
                break
        if as_json:
            echo_json(listed)
            return
        if not listed:
            click.echo("no jobs" + (f" with status {status}" if status else ""))
            return
        names = model_names(api, {job["model_id"] for job in listed})
        click.echo(
            format_table(
                [
                    [
                        job["id"],
                        job["status"],
                        names.get(job["model_id"], job["model_id"]),
                        progress_cell(job),
                        short_time(job.get("created_at")),
                    ]
                    for job in listed
                ],
                ["job", "status", "model", "stage / progress", "created (UTC)"],
            )
        )


def model_names(api: Client, model_ids: set[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    if not model_ids:
        return names
    for item in api.models.iter():
        if item.id in model_ids:
            names[item.id] = item.name or item.id
            if len(names) == len(model_ids):
                break
    return names


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON")
@connection_options
@click.pass_context
def jobs_show(
    ctx: click.Context, job_id: str, as_json: bool, url: str, api_key: str | None
) -> None:
    """Show one job: status, progress, metrics and artifacts."""
    url, api_key = (_inherited(ctx, "url", url), _inherited(ctx, "api_key", api_key))
    with api_session(url, api_key) as api:
        job = api.jobs.get(job_id).to_dict()
        if as_json:
            echo_json(job)
            return
        progress = job.get("progress") or {}
        rows = [
            ["status", job["status"]],
            ["model", model_label(api, job["model_id"])],
            ["recipe", describe_recipe(job.get("recipe"))],
            ["attempt", f"{job.get('attempt', '-')} of {job.get('max_attempts', '-')}"],
            ["created", short_time(job.get("created_at"))],
            ["started", short_time(job.get("started_at"))],
            ["finished", short_time(job.get("finished_at"))],
        ]
        if job["status"] in ("running", "cancelling"):
            eta = progress.get("eta_s")
            rows.append(
                [
                    "progress",
                    " ".join(
                        filter(
                            None,
                            [
                                progress_cell(job),
                                progress.get("message"),
                                f"eta {format_duration(eta)}" if is_number(eta) else None,
                            ],
                        )
                    ),
                ]
            )
        if job.get("metadata"):
            rows.append(["metadata", ", ".join(f"{k}={v}" for k, v in job["metadata"].items())])
        if job.get("error"):
            rows.append(["error", f"{job['error'].get('code')}: {job['error'].get('message')}"])
        click.echo(job["id"])
        click.echo(format_table(rows))
        if job.get("metrics"):
            click.echo()
            click.echo(metrics_table(job["metrics"]))
        if job.get("artifact_ids"):
            click.echo()
            click.echo(artifacts_table([a.to_dict() for a in api.artifacts.list(job_id)]))


def model_label(api: Client, model_id: str) -> str:
    try:
        return f"{api.models.get(model_id).name} ({model_id})"
    except SlimformerError:  # deleted since; the id is still worth showing
        return model_id


def _inherited(ctx: click.Context, name: str, value: Any) -> Any:
    """A connection option given to `jobs` (before `show`) counts unless `show` got its own."""
    if ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None) and ctx.parent:
        return ctx.parent.params.get(name, value)
    return value


@click.command()
@click.argument("job_or_artifact_id")
@click.option(
    "-o",
    "--output",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write into",
)
@click.option(
    "--kind",
    type=click.Choice(["model", "report", "log"]),
    default="model",
    show_default=True,
    help="Which of a job's artifacts to download",
)
@click.option(
    "--extract",
    is_flag=True,
    help="Unpack the archive next to it, into a folder named like it (the model's files inside)",
)
@connection_options
def download(
    job_or_artifact_id: str,
    directory: Path,
    kind: str,
    extract: bool,
    url: str,
    api_key: str | None,
) -> None:
    """Download a job's compressed model (or one artifact by art_ id), verified by sha256."""
    with api_session(url, api_key) as api:
        if job_or_artifact_id.startswith("art_"):
            wanted = [{"id": job_or_artifact_id}]
        else:
            artifacts = [a.to_dict() for a in api.artifacts.list(job_or_artifact_id)]
            wanted = [artifact for artifact in artifacts if artifact.get("kind") == kind]
            if not wanted:
                present = ", ".join(a.get("kind", "?") for a in artifacts) or "none"
                raise CommandError(
                    "not_found",
                    f"job {job_or_artifact_id} has no {kind} artifact (it has: {present})",
                )
        for artifact in wanted:
            path = download_artifact(
                api,
                artifact["id"],
                directory,
                expected_sha256=artifact.get("sha256"),
                filename=local_filename(artifact),
            )
            click.echo(str(path))
            if extract:
                click.echo(str(safe_extract(path, extraction_folder(path))))


@click.command()
@click.argument("job_id")
@connection_options
def cancel(job_id: str, url: str, api_key: str | None) -> None:
    """Ask a queued or running job to stop (it stops between steps)."""
    with api_session(url, api_key) as api:
        job = api.jobs.cancel(job_id)
        click.echo(f"{job.id} {job.status}")


# --- Models and datasets ------------------------------------------------------------------------


def _resource_group(collection: str, what: str, upload_help: str) -> click.Group:
    """`slimformer models|datasets` (list), `… show NAME_OR_ID`, `… upload FILE --name NAME`."""

    @click.group(name=collection, invoke_without_command=True, help=f"List {what} (newest first).")
    @click.option("--json", "as_json", is_flag=True, help=f"Print the {what} as JSON")
    @connection_options
    @click.pass_context
    def group(ctx: click.Context, as_json: bool, url: str, api_key: str | None) -> None:
        if ctx.invoked_subcommand is not None:
            return
        with api_session(url, api_key) as api:
            rows = [item.to_dict() for item in getattr(api, collection).iter()]
        if as_json:
            echo_json(rows)
            return
        if not rows:
            click.echo(f"no {what}")
            return
        click.echo(
            format_table(
                [
                    [
                        row["id"],
                        row.get("name") or "",
                        row.get("status") or "",
                        (row.get("source") or {}).get("type", ""),
                        short_time(row.get("created_at")),
                    ]
                    for row in rows
                ],
                ["id", "name", "status", "source", "created (UTC)"],
            )
        )

    @group.command("show", help=f"Show one of the {what}, by name or id, as JSON.")
    @click.argument("name_or_id")
    @connection_options
    @click.pass_context
    def show(ctx: click.Context, name_or_id: str, url: str, api_key: str | None) -> None:
        url, api_key = (_inherited(ctx, "url", url), _inherited(ctx, "api_key", api_key))
        with api_session(url, api_key) as api:
            resources = getattr(api, collection)
            echo_json(resources.get(resolve_id(api, collection, name_or_id)).to_dict())

    @group.command("upload", help=upload_help)
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--name", help="Name [the file's name]")
    @click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for validation")
    @connection_options
    @click.pass_context
    def upload(
        ctx: click.Context, file: Path, name: str | None, wait: bool, url: str, api_key: str | None
    ) -> None:
        url, api_key = (_inherited(ctx, "url", url), _inherited(ctx, "api_key", api_key))
        with api_session(url, api_key) as api:
            resources = getattr(api, collection)
            item = resources.upload(file, name=name)
            if wait:
                item = resources.wait_validated(item.id)
            item = item.to_dict()
        click.echo(f"{item['id']} {item.get('status')}")
        if item.get("status") == "rejected":
            error = item.get("error") or {}
            click.echo(f"{error.get('code')}: {error.get('message')}", err=True)
            raise click.exceptions.Exit(1)

    return group


models = _resource_group(
    "models",
    "models",
    "Upload a model: a .zip or .tar.gz of a Hugging Face folder (safetensors or one GGUF).",
)
datasets = _resource_group(
    "datasets", "datasets", 'Upload a dataset: .txt (a record per line) or .jsonl ({"text": …}).'
)
