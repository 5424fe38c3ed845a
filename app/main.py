"""The FastAPI application."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from app.artifacts.router import router as artifacts_router
from app.datasets.router import router as datasets_router
from app.errors import install_error_handlers
from app.jobs.router import router as jobs_router
from app.middleware import HttpLayer, RequestContext, on_response_start
from app.models.router import router as models_router
from app.openapi import install as install_openapi
from app.ops.router import HTTP_LATENCY
from app.ops.router import router as ops_router
from app.webhooks.router import router as webhooks_router
from app.workers.router import router as workers_router

STATIC = Path(__file__).parent / "static"
# Swagger UI for /docs, vendored from npm (swagger-ui-dist 5.36.0): an install without internet
# access shows the API, not a blank page.
DASHBOARD_PATHS = (
    "/",
    "/jobs",
    "/jobs/{job_id}",
    "/new",
    "/compare",
    "/models",
    "/models/{model_id}",
    "/datasets",
    "/datasets/{dataset_id}",
    "/workers",
)


class RequestTiming(HttpLayer):
    """The request-latency histogram, as a pure ASGI layer: Starlette's `@app.middleware("http")`
    wraps every request in a task group and a body stream, which cost more than a cached read."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500

        def note_status(message: Message) -> Message:
            nonlocal status
            status = message["status"]
            return message

        try:
            await self.app(scope, receive, on_response_start(send, note_status))
        finally:
            route = scope.get("route")
            HTTP_LATENCY.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status)
            ).observe(time.perf_counter() - started)


def _telemetry() -> dict[str, bool] | None:
    """FastAPI's native OpenTelemetry asks the global providers whether anyone configured them on
    every request (environment reads, ~20 µs, a few % of a cached read). Left as FastAPI sets it
    where the process starts with OpenTelemetry configured (any `OTEL_*` variable, or FastAPI's
    own auto-configuration); off otherwise."""
    if any(name.startswith(("OTEL_", "FASTAPI_OTEL_")) for name in os.environ):
        return None
    return {"tracing": False, "metrics": False, "logs": False}


def create_app() -> FastAPI:
    app = FastAPI(
        telemetry=_telemetry(),
        title="Slimformer",
        version="1.0.0",
        description="Compress Transformer models as durable jobs. See API.md.",
        docs_url=None,  # served below from local assets: no CDN (offline installs)
        redoc_url=None,
    )
    install_error_handlers(app)
    for router in (
        models_router,
        datasets_router,
        jobs_router,
        artifacts_router,
        workers_router,
        webhooks_router,
        ops_router,
    ):
        app.include_router(router)

    app.add_middleware(RequestTiming)
    install_openapi(app)
    app.add_middleware(RequestContext)  # outermost: request id, NUL bytes, 500 envelope

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="Slimformer API",
            swagger_js_url="/static/vendor/swagger-ui-5.36.0/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui-5.36.0/swagger-ui.css",
            swagger_favicon_url="/static/vendor/swagger-ui-5.36.0/favicon-32x32.png",
        )

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        def dashboard() -> FileResponse:
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

        # The dashboard's own URLs (History API): a job, model or dataset page opened directly
        # or reloaded gets the page, which then shows what its path names.
        for path in DASHBOARD_PATHS:
            app.add_api_route(path, dashboard, methods=["GET"], include_in_schema=False)

    return app
