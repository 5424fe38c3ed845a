"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong without one:
every `slimformer …` command parses against the real CLI, and the settings that keep jobs alive
(broker never evicts, the GPU worker gets a GPU, nothing starts before what it needs) are there."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from slimformer.cli import cli
from slimformer.commands import register_client_commands

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


@pytest.fixture(scope="module")
def slimformer() -> click.Group:
    register_client_commands(cli)
    return cli


def argv(service: dict[str, Any]) -> list[str]:
    def words(value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]

    return words(service.get("entrypoint")) + words(service.get("command"))


def parse(group: click.Group, args: list[str]) -> click.Context:
    """Parse `args` down the command tree the way `slimformer` would, without running anything.
    Unknown commands, unknown options and bad values raise click's UsageError/BadParameter."""
    command: click.Command = group
    name, parent = "slimformer", None
    while True:
        ctx = command.context_class(command, info_name=name, parent=parent)
        assert not ctx.resilient_parsing
        # Command.parse_args on a group parses its own options and leaves the rest: the
        # subcommand and its arguments.
        rest = click.Command.parse_args(command, ctx, list(args))
        if not isinstance(command, click.Group):
            return ctx
        if not rest:
            if command.invoke_without_command:
                return ctx
            raise click.UsageError(f"{name}: missing command", ctx)
        name, subcommand, args = command.resolve_command(ctx, rest)
        assert subcommand is not None
        command, parent = subcommand, ctx


def slimformer_services(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {
        name: argv(spec)[1:] for name, spec in services.items() if argv(spec)[:1] == ["slimformer"]
    }


def test_the_application_services_run_slimformer(services):
    assert set(slimformer_services(services)) == {
        "migrate",
        "api",
        "worker-cpu",
        "worker-gpu-0",
        "worker-gpu-1",
    }


def test_every_slimformer_command_parses_against_the_real_cli(services, slimformer):
    for name, args in slimformer_services(services).items():
        ctx = parse(slimformer, args)
        assert not isinstance(ctx.command, click.Group), f"{name}: {args} stops at a group"


def test_the_parser_used_above_rejects_what_slimformer_would(slimformer):
    with pytest.raises(click.NoSuchOption):
        parse(slimformer, ["worker", "--queue", "cpu"])
    with pytest.raises(click.UsageError):
        parse(slimformer, ["wroker"])
    with pytest.raises(click.BadParameter):
        parse(slimformer, ["worker", "--concurrency", "one"])
    assert parse(slimformer, ["jobs", "show", "job_1"]).params["job_id"] == "job_1"


def test_services_run_with_the_parameters_they_are_meant_to(services, slimformer):
    commands = slimformer_services(services)
    api = parse(slimformer, commands["api"]).params
    assert (api["host"], api["port"]) == ("0.0.0.0", 8000)
    # Workers take the queues of the device they detect (cpu or gpu, plus validate).
    cpu = parse(slimformer, commands["worker-cpu"]).params
    assert cpu["queues"] is None and cpu["hostname"] == "cpu@%h"
    assert services["worker-cpu"]["environment"]["SLIMFORMER_DEVICE"] == "cpu"
    names = set()
    for name in ("worker-gpu-0", "worker-gpu-1"):
        gpu = parse(slimformer, commands[name]).params
        assert gpu["queues"] is None and gpu["concurrency"] == 1
        names.add(gpu["hostname"])
    assert len(names) == 2  # one Celery node name per GPU worker


def test_redis_never_evicts_and_persists(services):
    command = argv(services["redis"])
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert services["redis"]["image"].startswith("redis:7")


def test_each_gpu_worker_is_pinned_to_its_own_gpu_and_the_cpu_worker_has_none(services):
    pinned = []
    for name in ("worker-gpu-0", "worker-gpu-1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device and len(device["device_ids"]) == 1
        pinned += device["device_ids"]
    assert sorted(pinned) == ["0", "1"]
    assert "deploy" not in services["worker-cpu"]


def test_long_running_services_are_healthchecked_or_wait_for_healthy_ones(services):
    one_shot = {name for name, spec in services.items() if spec.get("restart") == "no"}
    assert one_shot == {"migrate"}
    for name, spec in services.items():
        conditions = {
            dependency: (rule or {}).get("condition")
            for dependency, rule in (spec.get("depends_on") or {}).items()
        }
        for dependency, condition in conditions.items():
            expected = (
                "service_completed_successfully" if dependency in one_shot else "service_healthy"
            )
            assert condition == expected, f"{name} -> {dependency}: {condition}"
            assert dependency in one_shot or "healthcheck" in services[dependency]
        if name not in one_shot:
            assert "healthcheck" in spec or conditions, f"{name}: neither healthcheck nor waits"


def test_the_api_starts_after_a_successful_migration_and_checks_healthz(services):
    api = services["api"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_application_services_share_one_image_and_the_production_settings(services):
    application = [spec for spec in services.values() if argv(spec)[:1] == ["slimformer"]]
    assert len({(spec["image"], spec["build"]) for spec in application}) == 1
    for spec in application:
        env = spec["environment"]
        assert env["SLIMFORMER_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SLIMFORMER_BROKER_URL"] == "redis://redis:6379/0"
        # Every application container sees the same artifact store: the bucket on MinIO.
        assert env["SLIMFORMER_STORAGE_URL"] == "s3://slimformer/v1"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
        assert not any(volume.endswith(":/data/storage") for volume in spec["volumes"])
        assert env["SLIMFORMER_DATA_DIR"] == "/data"


def test_storage_is_minio_and_everything_that_stores_waits_for_it(services):
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio:RELEASE.")
    assert argv(minio)[:2] == ["server", "/data"]
    assert "minio-data:/data" in minio["volumes"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    # The root password the app signs with is the one MinIO starts with, never a default.
    assert (
        minio["environment"]["MINIO_ROOT_PASSWORD"]
        == "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
    )
    # migrate creates the bucket and seeds it; the API and workers read and write it.
    for name in ("migrate", "api", "worker-cpu", "worker-gpu-0", "worker-gpu-1"):
        assert services[name]["depends_on"]["minio"]["condition"] == "service_healthy", name
