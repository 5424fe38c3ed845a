"""Settings: the one leaf module that the API, the workers and the CLI all read.

Every value comes from an environment variable with the `SLIMFORMER_` prefix. With nothing set, the
service runs on its embedded default: SQLite, a local artifact folder and kombu's filesystem broker,
all under `data_dir`.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMFORMER_", extra="ignore")

    data_dir: Path = Path(".slimformer")
    database_url: str | None = None  # default: sqlite:///<data_dir>/slimformer.db
    broker_url: str | None = None  # default: filesystem:// under <data_dir>/broker
    storage_url: str | None = None  # default: file://<data_dir>/storage; or s3://bucket/prefix
    # S3 storage: presigned download URLs are signed for this endpoint when clients reach the store
    # by another name than the API and workers do (AWS_ENDPOINT_URL); unset = the same one.
    s3_presign_endpoint_url: str | None = None
    # GET /v1/artifacts/{id}/content answers 307 to a presigned URL without `?redirect=true`
    # (where the store has such URLs); `?redirect=false` still streams.
    download_redirect: bool = False
    download_url_ttl_s: int = Field(default=300, ge=1, le=7 * 24 * 3600)  # S3's maximum: 7 days
    queue_prefix: str = ""  # prefixes Celery queue names (lets tests share one Redis)

    # None = decided by the backend: off for the embedded default (single user), on otherwise.
    auth: bool | None = None
    allow_insecure: bool = False  # permit auth off on a networked database

    max_upload_bytes: int = 4 * 1024**3
    max_record_bytes: int = 1024 * 1024  # one dataset line (a `.txt` or `.jsonl` record)
    max_archive_members: int = 10_000
    max_extracted_bytes: int = 16 * 1024**3
    model_path_roots: list[Path] = Field(default_factory=list)  # allow-list for source.type=path

    # Rate limit per API key (app/ratelimit.py): a token bucket refilled at `rate_limit_per_s`
    # holding at most `rate_limit_burst` requests; 0 turns it off. Shared through Redis when the
    # broker is Redis, kept in each API process on the embedded default.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 100
    # Per-project quotas (app/quotas.py); 0 turns one off. Live jobs are queued, running or
    # cancelling; stored bytes are the project's uploaded models and datasets plus its artifacts.
    max_live_jobs_per_project: int = 0
    max_stored_bytes_per_project: int = 0

    lease_s: float = 60.0  # a running job's lease; the heartbeat renews it every lease_s / 4
    reaper_interval_s: float = 15.0
    requeue_after_s: float = 300.0  # a queued job untouched this long gets its message re-sent
    default_max_attempts: int = 3
    default_max_runtime_s: int = 7200
    progress_min_interval_s: float = 0.5  # throttle for progress events
    # Fairness (workers/fairness.py): at most this many running jobs per project; a job over the
    # cap waits (queued, not failed) until one of its project's jobs ends. 0: no cap.
    max_running_per_project: int = Field(default=0, ge=0)
    # Event streams (app/jobs/feed.py): how often the embedded default's one poller per API process
    # looks for new events, and how often an idle stream sends a heartbeat comment line.
    sse_poll_s: float = 0.5
    sse_heartbeat_s: float = 15.0
    # Each worker refreshes its row in `workers` this often; one that missed this many beats in a
    # row is lost (not counted for routing, /readyz or /metrics). API and workers must agree.
    worker_heartbeat_s: float = 10.0
    worker_lost_after_beats: int = 3
    # Run a job's model one block at a time with the rest on disk (workers/compression/streaming.py):
    # "auto" when the whole model would not fit the worker's memory, or "always" / "never".
    streaming: Literal["auto", "always", "never"] = "auto"
    idempotency_ttl_s: int = 48 * 3600
    broker_polling_interval_s: float = 0.2  # filesystem broker only

    # Webhooks (app/webhooks, workers/webhooks.py). A delivery that keeps failing is retried with
    # exponential backoff and jitter for `webhook_retry_window_s`, then its endpoint is disabled.
    webhook_timeout_s: float = 10.0
    webhook_retry_window_s: float = 24 * 3600
    webhook_backoff_base_s: float = 5.0
    webhook_backoff_max_s: float = 3600.0
    webhook_progress_interval_s: float = 30.0  # at most one job.progress per endpoint this often
    # A pending delivery due this long ago with no attempt in flight lost its message: re-sent.
    webhook_sweep_after_s: float = 60.0
    # Destinations allowed although they resolve to loopback/private/link-local addresses:
    # host names, IP addresses or CIDR networks.
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    public_url: str = ""  # prefixes the `link` in webhook payloads (e.g. https://slim.example)

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.auth is False and not self.is_embedded_database and not self.allow_insecure:
            raise ValueError(
                "SLIMFORMER_AUTH=false with a networked database would expose every project; "
                "set SLIMFORMER_ALLOW_INSECURE=true if that is really what you want"
            )
        if self.lease_s <= 0 or self.reaper_interval_s <= 0 or self.worker_heartbeat_s <= 0:
            raise ValueError("lease_s, reaper_interval_s and worker_heartbeat_s must be positive")
        if self.rate_limit_per_s < 0 or self.rate_limit_burst < 1:
            raise ValueError("rate_limit_per_s must be >= 0 (0: off) and rate_limit_burst >= 1")
        if self.max_live_jobs_per_project < 0 or self.max_stored_bytes_per_project < 0:
            raise ValueError("per-project quotas must be >= 0 (0: off)")
        if self.worker_lost_after_beats < 2:
            raise ValueError(
                "worker_lost_after_beats must be at least 2: one late beat is not a loss"
            )
        return self

    @cached_property  # every request asks (app.db.session.get_engine); resolve() is a syscall
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'slimformer.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        # kombu's filesystem transport, with atomic writes (app/broker_fs.py)
        return self.broker_url or "slimfs://"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'storage').resolve()}"

    @property
    def is_embedded_database(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def is_filesystem_broker(self) -> bool:
        return self.resolved_broker_url.startswith(("slimfs", "filesystem"))

    @property
    def redis_url(self) -> str | None:
        """The broker's Redis, which the API also uses for shared state (rate limits)."""
        url = self.resolved_broker_url
        return url if url.startswith(("redis://", "rediss://")) else None

    @property
    def auth_enabled(self) -> bool:
        return self.auth if self.auth is not None else not self.is_embedded_database

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def cache_dir(self) -> Path:
        """Worker-local scratch: extracted models, converted built-ins. Safe to delete."""
        return (self.data_dir / "cache").resolve()

    @property
    def worker_lost_after_s(self) -> float:
        return self.worker_heartbeat_s * self.worker_lost_after_beats

    def queue(self, name: str) -> str:
        return f"{self.queue_prefix}{name}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
