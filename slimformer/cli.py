"""`slimformer`: the composition root. It starts the API, the worker or both, runs migrations, makes
API keys, and carries the client commands (submit, jobs, download). Nothing imports this module."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from app.settings import get_settings
from slimformer.supervisor import AlreadyServing, Supervisor, lock_data_dir


@click.group()
def cli() -> None:
    """Slimformer: compress Transformer models as durable jobs."""


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema, create the storage bucket if it is missing, and
    register the built-in examples."""
    _migrate_and_seed()
    click.echo(f"database at {_redacted(get_settings().resolved_database_url)} is up to date")


def _migrate_and_seed() -> None:
    from app.db.migrate import upgrade
    from app.storage import get_store
    from workers.seed import seed_builtins

    upgrade()
    get_store().prepare()
    seed_builtins()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="API processes sharing the port (each with its own event notifier)",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="a log line per request (CPU on every request; the request-latency histogram in /metrics "
    "counts every request either way)",
)
def api(host: str, port: int, workers: int, access_log: bool) -> None:
    """Run the HTTP API only (production: workers run separately)."""
    import uvicorn

    log_level = get_settings().log_level.lower()
    if workers == 1:
        from app.main import create_app

        uvicorn.run(create_app(), host=host, port=port, log_level=log_level, access_log=access_log)
        return
    # Several processes: /metrics must add up every process's request histograms, which
    # prometheus_client does through files in one folder named before any process imports it.
    metrics_dir = tempfile.mkdtemp(prefix="slimformer-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=access_log,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@cli.command()
@click.option(
    "--queues",
    default=None,
    help="Comma-separated queues of cpu, gpu, validate, webhooks [default: the queue of this "
    "worker's device class, plus validate; webhooks run in a companion worker, see --webhooks]",
)
@click.option(
    "--cpu-jobs/--no-cpu-jobs",
    default=False,
    show_default=True,
    help="A GPU worker also takes the cpu queue's jobs, run on its CPU (`serve` does: its one "
    "worker takes every job)",
)
@click.option("--concurrency", default=1, show_default=True, type=int)
@click.option("--hostname", default=None, help="Celery node name (default: celery@<host>)")
@click.option(
    "--reaper/--no-reaper",
    default=True,
    show_default=True,
    help="Run the lease reaper loop in this worker",
)
@click.option(
    "--validate/--no-validate",
    default=True,
    show_default=True,
    help="Also take model validations (ignored with --queues); `serve` runs a validator of its own "
    "so an upload never waits behind a job",
)
@click.option(
    "--webhooks/--no-webhooks",
    default=True,
    show_default=True,
    help="Also run a thread-pool worker for webhook deliveries beside this one",
)
def worker(
    queues: str | None,
    cpu_jobs: bool,
    concurrency: int,
    hostname: str | None,
    reaper: bool,
    validate: bool,
    webhooks: bool,
) -> None:
    """Run a Celery worker (prefork; one job per process) for this machine's device class.

    The device is the engine's (`SLIMFORMER_DEVICE`, else CUDA when there is one), detected in a
    child process so that CUDA is never initialised in the worker that forks. One GPU per worker:
    on a machine with several, start one worker per GPU, each with `CUDA_VISIBLE_DEVICES=<index>`
    and its own `--hostname`.
    """
    import json

    from app.broker import CPU_QUEUE, JOB_QUEUES, VALIDATE_QUEUE, WEBHOOK_QUEUE
    from workers.presence import DEVICE_ENV, default_queues, probe

    settings = get_settings()
    try:
        description = probe()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    device = description["device"]
    if queues:
        names = [name.strip() for name in queues.split(",") if name.strip()]
    else:
        names = default_queues(device) + ([CPU_QUEUE] if cpu_jobs and device != CPU_QUEUE else [])
        if not validate:
            names.remove(VALIDATE_QUEUE)
    unknown = sorted(set(names) - {*JOB_QUEUES, VALIDATE_QUEUE, WEBHOOK_QUEUE})
    if unknown:
        raise click.BadParameter(
            f"unknown queue(s) {', '.join(unknown)}: choose from cpu, gpu, validate, webhooks",
            param_hint="--queues",
        )
    if device == "gpu" and concurrency != 1:
        raise click.BadParameter(
            "a GPU worker runs one job at a time: start one worker per GPU, each with "
            "CUDA_VISIBLE_DEVICES=<index>",
            param_hint="--concurrency",
        )
    if description.get("visible_gpus", 0) > 1:
        click.echo(
            f"slimformer worker: {description['visible_gpus']} GPUs visible and one is used; "
            "pin one GPU per worker with CUDA_VISIBLE_DEVICES",
            err=True,
        )
    click.echo(
        f"slimformer worker: {device} ({description.get('device_name')}), queues {','.join(names)}",
        err=True,
    )
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app:celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--queues",
        ",".join(settings.queue(name) for name in names),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        args += ["--hostname", hostname]
    env = dict(
        os.environ,
        SLIMFORMER_REAPER="1" if reaper else "0",
        **{DEVICE_ENV: json.dumps(description)},
    )
    if webhooks and WEBHOOK_QUEUE not in names:
        _start_webhook_worker(hostname, env)
    os.execve(sys.executable, args, env)


def _start_webhook_worker(hostname: str | None, env: dict[str, str]) -> None:
    """Webhook deliveries are short HTTP calls that must never wait behind a job, and a job worker
    runs one job at a time: so each job worker brings a thread-pool Celery worker on the webhook
    queue. It dies with its parent (PR_SET_PDEATHSIG), which execs into the job worker next."""
    from app.broker import WEBHOOK_QUEUE

    node = f"webhooks-{hostname}" if hostname else "webhooks@%h"
    subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app:celery_app",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "8",
            "--queues",
            get_settings().queue(WEBHOOK_QUEUE),
            "--hostname",
            node,
            "--loglevel",
            get_settings().log_level,
            "--without-gossip",
            "--without-mingle",
        ],
        env=dict(env, SLIMFORMER_REAPER="0", SLIMFORMER_PRESENCE="0"),
        preexec_fn=_die_with_parent,
    )


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the embedded database, broker and artifacts live (default: ./.slimformer)",
)
def serve(host: str, port: int, data_dir: Path | None) -> None:
    """Everything on one machine: migrations, the API and a real Celery worker (embedded default)."""
    if data_dir is not None:
        os.environ["SLIMFORMER_DATA_DIR"] = str(data_dir)
        get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_data_dir(settings.data_dir)
    except AlreadyServing as exc:
        raise click.ClickException(str(exc)) from exc
    _migrate_and_seed()
    if not settings.auth_enabled:
        click.echo(
            "slimformer: authentication is OFF (embedded single-user mode); "
            "every request acts as project 'default'",
            err=True,
        )
    # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again with the handler
    # it found: for SIGTERM that must unwind through `finally` (the default handler would end the
    # process on the spot and orphan the workers), as KeyboardInterrupt does for SIGINT.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    me = [sys.executable, "-m", "slimformer.cli", "worker"]
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    supervisors = [
        # The job worker (every device class's jobs, one at a time), its webhook companion and the
        # reaper; and a validator, so that an upload is checked while a job runs.
        Supervisor("worker", [*me, "--cpu-jobs", "--no-validate"], os.environ.copy(), say),
        Supervisor(
            "validator",
            [
                *me,
                "--queues",
                "validate",
                "--no-webhooks",
                "--no-reaper",
                "--hostname",
                "validator@%h",
            ],
            os.environ.copy(),
            say,
        ),
    ]
    for supervisor in supervisors:
        supervisor.start()
    try:
        api.callback(host=host, port=port, workers=1, access_log=False)  # type: ignore[misc]
    finally:
        for supervisor in supervisors:
            supervisor.stop()
        lock.close()


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@cli.group()
def keys() -> None:
    """API keys (one project each)."""


@keys.command("create")
@click.option("--project", required=True, help="Project name (created if new)")
def keys_create(project: str) -> None:
    """Create an API key for PROJECT and print it once; only its hash is stored."""
    from app.db.session import session_scope
    from app.projects.service import create_api_key

    with session_scope() as session:
        key = create_api_key(session=session, project_name=project)
    click.echo(key)


def _redacted(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def main() -> None:
    from slimformer.commands import register_client_commands

    register_client_commands(cli)
    cli()


if __name__ == "__main__":
    main()
