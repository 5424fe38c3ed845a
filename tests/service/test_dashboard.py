"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, installed by
`.ci/services`) driven by Playwright, against the real API and worker.

A MiniLM job is submitted from the form, followed live to the end, its chart drawn and its artifact
downloaded; the pages have their own URLs and the browser's history walks them; no page shows a
literal null. Embedded backend only: the browser sees the same HTTP API on either backend."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BACKEND, Service, builtin_id, wait_for

pytestmark = [
    pytest.mark.service,
    pytest.mark.real_model,
    pytest.mark.skipif(BACKEND != "embedded", reason="the browser tests run on the embedded backend"),
]

playwright_api = pytest.importorskip("playwright.sync_api")

# Set to a folder to keep the screenshots (they go to the test's tmp_path otherwise).
SHOTS = os.environ.get("SLIMFORMER_DASHBOARD_SHOTS")
NULLISH = ("null", "undefined", "NaN", "[object Object]")


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no system Chromium: `.ci/services` installs Debian's `chromium` package")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service: Service) -> Iterator:  # noqa: ANN001
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    key = service.key("alpha") if service.env.get("SLIMFORMER_AUTH") != "false" else ""
    context.add_init_script(f"localStorage.setItem('slimformer.apiKey', {key!r})")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    yield page
    context.close()
    assert not errors, errors


def shot(page, tmp_path: Path, name: str) -> None:  # noqa: ANN001
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def assert_no_nullish(page) -> None:  # noqa: ANN001
    words = set(page.inner_text("body").replace("\u00b7", " ").split())
    assert not words & set(NULLISH), words & set(NULLISH)


def canvas_has_ink(page, selector: str) -> bool:  # noqa: ANN001
    """Whether the chart's canvas has coloured pixels (drawn bars), not only its frame."""
    return page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            if (!canvas) return false;
            const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
            let coloured = 0;
            for (let i = 0; i < data.length; i += 4) {
                const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
                if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured += 1;
            }
            return coloured > 200;
        }""",
        selector,
    )


def test_submit_from_the_form_watch_it_live_and_download(
    service: Service, page, tmp_path: Path  # noqa: ANN001
) -> None:
    with service.client() as client:
        minilm = builtin_id(client, "models", "all-MiniLM-L6-v2")
        sentences = builtin_id(client, "datasets", "lee-sentences")

    page.goto(f"{service.base_url}/new")
    page.select_option("#model", minilm)
    page.get_by_role("button", name="INT8 dynamic (CPU)").click()
    page.select_option("[name='evaluation.dataset_id']", sentences)
    page.fill("[name='evaluation.seq_len']", "128")
    page.fill("[name='evaluation.max_samples']", "64")
    page.fill("[name='evaluation.latency.runs']", "5")
    page.uncheck("[name=cache]")  # run it, whatever ran before in this session
    shot(page, tmp_path, "new-job-form")
    page.click("#submit-job")

    # The job's own URL, and its events streamed live while it runs.
    page.wait_for_url("**/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#stream-mode[data-mode=live]", timeout=30_000)
    page.wait_for_selector(".timeline li", timeout=120_000)
    page.wait_for_selector("h2 .status.succeeded", timeout=300_000)
    page.wait_for_selector("[data-chart=baseline-vs-compressed] canvas", timeout=20_000)
    page.wait_for_function("document.querySelectorAll('.timeline li.done').length >= 5")
    shot(page, tmp_path, "job-succeeded")

    with service.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert job["status"] == "succeeded" and job["cache"] is False
    assert job["recipe"]["stages"][0]["method"] == "dynamic_int8"
    assert job["evaluation"]["dataset_id"] == sentences
    assert job["evaluation"]["max_samples"] == 64

    # Every event arrived in the page's log, and the chart has bars in it.
    assert page.locator("#events > div").count() == len(events)
    assert canvas_has_ink(page, "[data-chart=baseline-vs-compressed] canvas")
    # The size went down: that change is coloured as good, whatever its sign.
    size_row = page.locator(".part-metrics tr", has_text="size_bytes")
    assert size_row.locator(".change.good").count() == 1
    assert_no_nullish(page)

    model = next(a for a in artifacts if a["kind"] == "model")
    with page.expect_download() as download_info:
        page.get_by_role("link", name=model["filename"]).click()
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert download.suggested_filename == model["filename"]
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == model["sha256"]


def test_urls_history_compare_and_upload(service: Service, page, tmp_path: Path) -> None:  # noqa: ANN001
    with service.client() as client:
        minilm = builtin_id(client, "models", "all-MiniLM-L6-v2")
        sentences = builtin_id(client, "datasets", "lee-sentences")
        body = {
            "model_id": minilm,
            "recipe": {"stages": [{"method": "dynamic_int8"}]},
            "evaluation": {
                "dataset_id": sentences,
                "seq_len": 128,
                "max_samples": 64,
                "latency": {"runs": 5},
            },
        }
        # The same inputs twice: the second (and the first, after the form's job) is a cache hit.
        first = client.post("/v1/jobs", json=body).json()["id"]
        wait_for(client, first, {"succeeded"}, timeout=300)
        second = client.post("/v1/jobs", json={**body, "priority": 1}).json()["id"]
        wait_for(client, second, {"succeeded"}, timeout=120)

    base = service.base_url
    page.goto(f"{base}/")
    page.wait_for_selector(f"tr[data-job={second}]")
    assert_no_nullish(page)
    # The job list's headline column: the quality metric against the baseline.
    assert "cosine" in page.locator(f"tr[data-job={second}]").inner_text()
    shot(page, tmp_path, "job-list")

    page.click(f"tr[data-job={second}] a[href='/jobs/{second}']")
    page.wait_for_url(f"{base}/jobs/{second}")
    page.wait_for_selector("h2 .status.succeeded")
    assert page.locator("h2 .mono").inner_text() == second
    page.click(f".part-head a[href='/models/{minilm}']")
    page.wait_for_url(f"{base}/models/{minilm}")
    page.wait_for_selector(f"a[href='/jobs/{second}']")
    assert_no_nullish(page)

    page.go_back()
    page.wait_for_url(f"{base}/jobs/{second}")
    page.wait_for_selector("h2 .status.succeeded")
    page.go_back()
    page.wait_for_url(f"{base}/")
    page.wait_for_selector(f"tr[data-job={first}]")
    page.go_forward()
    page.wait_for_selector(f"h2:has-text('{second}')")
    # Opened directly (a bookmark, a reload), a job's URL shows that job.
    page.goto(f"{base}/jobs/{first}")
    page.wait_for_selector(f"h2:has-text('{first}') .status.succeeded")
    assert_no_nullish(page)

    # Compare: tick two jobs in the list.
    page.goto(f"{base}/")
    page.check(f"tr[data-job={first}] input[type=checkbox]")
    page.check(f"tr[data-job={second}] input[type=checkbox]")
    page.get_by_role("button", name="Compare selected").click()
    page.wait_for_url(f"{base}/compare?jobs=*")
    page.wait_for_selector("[data-chart=compare] canvas")
    assert page.locator("table.compare thead th").count() == 3
    assert_no_nullish(page)
    shot(page, tmp_path, "compare")

    # "Edit as new job" in raw-JSON mode: the copied spec, edited as text, submitted as it is.
    page.goto(f"{base}/jobs/{second}")
    page.get_by_role("link", name="Edit as new job").click()
    page.wait_for_url(f"{base}/new?from={second}")
    page.wait_for_selector("#job-form fieldset.stage")
    page.check("#raw-mode")
    raw = json.loads(page.input_value("#raw-json"))
    assert raw["model_id"] == minilm and raw["recipe"]["stages"][0]["method"] == "dynamic_int8"
    assert raw["evaluation"]["dataset_id"] == sentences
    raw["metadata"] = {"from": "raw-json"}
    page.fill("#raw-json", json.dumps(raw))
    page.click("#submit-job")
    page.wait_for_url(f"{base}/jobs/job_*")
    third = page.url.rsplit("/", 1)[1]
    page.wait_for_selector(f"h2:has-text('{third}') .status.succeeded", timeout=120_000)
    with service.client() as client:
        assert client.get(f"/v1/jobs/{third}").json()["metadata"] == {"from": "raw-json"}

    # Without an event stream (a proxy that buffers it, say) the page polls the event list.
    def no_stream(route) -> None:  # noqa: ANN001
        if "text/event-stream" in (route.request.headers.get("accept") or ""):
            route.abort()
        else:
            route.fallback()

    page.route("**/v1/jobs/*/events*", no_stream)
    page.goto(f"{base}/jobs/{first}")
    page.wait_for_selector("#stream-mode[data-mode=done][data-polled=yes]", timeout=30_000)
    with service.client() as client:
        events = client.get(f"/v1/jobs/{first}/events", params={"limit": 1000}).json()["data"]
    assert page.locator("#events > div").count() == len(events)
    page.unroute("**/v1/jobs/*/events*")

    # Upload a dataset from its page: a progress bar, then the new dataset's own page.
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"Sentence number {i} about compressing models." for i in range(2000)))
    page.goto(f"{base}/datasets")
    page.set_input_files("#dataset-file", str(text))
    page.fill("#dataset-name", "browser-notes")
    page.click("#dataset-upload button[type=submit]")
    page.wait_for_url(f"{base}/datasets/dset_*")
    page.wait_for_selector("h2:has-text('browser-notes')")
    deadline = time.monotonic() + 60
    while "ready" not in page.locator("h2 .status").inner_text() and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    assert page.locator("h2 .status").inner_text() == "ready"
    assert_no_nullish(page)


def test_changes_are_coloured_by_what_is_good_and_trials_are_charted(
    service: Service, page, tmp_path: Path  # noqa: ANN001
) -> None:
    """The formatting and chart code on the issue's own examples (a job with search trials comes
    from the search; here the page draws trials given to it)."""
    page.goto(f"{service.base_url}/workers")
    page.wait_for_selector("main h2:has-text('Workers')")
    verdicts = page.evaluate(
        """async () => {
            const { change } = await import("/static/js/dom.js");
            const verdict = (name, before, after) => change(name, before, after).className;
            return {
                tokens_per_s: verdict("tokens_per_s", 100, 117.9),
                embedding_cosine: verdict("embedding_cosine", 1.0, 0.993),
                perplexity: verdict("perplexity", 25.95, 35.91),
                latency_ms_p50: verdict("latency_ms_p50", 38, 20),
                size_bytes: verdict("size_bytes", 90e6, 30e6),
            };
        }"""
    )
    assert verdicts == {
        "tokens_per_s": "change good",
        "embedding_cosine": "change bad",
        "perplexity": "change bad",
        "latency_ms_p50": "change good",
        "size_bytes": "change good",
    }
    drawn = page.evaluate(
        """async () => {
            const { trialsChart } = await import("/static/js/charts.js");
            const trials = [[90, 25.9, false, true], [40, 26.5, true, true], [30, 28.0, true, true],
                            [35, 30.0, false, false], [22, 41.0, false, true]]
                .map(([mib, ppl, held, pareto], index) => ({ index, kind: "candidate", recipe: {},
                    metrics: { perplexity: ppl }, size_bytes: mib * 1048576, bits_per_weight: 4.5,
                    seconds: 10, held, pareto }));
            const chart = trialsChart(trials, "perplexity", "size_bytes");
            document.querySelector("main").append(chart);
            await new Promise((resolve) => setTimeout(resolve, 300));
            return { canvas: !!chart.querySelector("canvas"),
                     legend: [...chart.querySelectorAll(".u-legend .u-label")].map((e) => e.textContent) };
        }"""
    )
    assert drawn["canvas"]
    assert {"held the targets", "missed", "Pareto front"} <= set(drawn["legend"])
    assert canvas_has_ink(page, "[data-chart=trials] canvas")
    page.locator("[data-chart=trials]").screenshot(path=str(Path(SHOTS or tmp_path) / "trials.png"))


def test_cancel_retry_and_delete_buttons(service: Service, page) -> None:  # noqa: ANN001
    """On jobs that wait for a GPU worker (there is none): they cost nothing while queued."""
    with service.client() as client:
        minilm = builtin_id(client, "models", "all-MiniLM-L6-v2")
        body = {
            "model_id": minilm,
            "recipe": {"stages": [{"method": "rtn"}]},
            "resources": {"device": "gpu"},
        }
        job_id = client.post("/v1/jobs", json=body).json()["id"]
    page.on("dialog", lambda dialog: dialog.accept())
    base = service.base_url
    page.goto(f"{base}/jobs/{job_id}")
    page.wait_for_selector("h2 .status.queued")
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("h2 .status.cancelled")
    assert_no_nullish(page)

    page.get_by_role("button", name="Retry").click()
    page.wait_for_url(lambda url: "/jobs/job_" in url and not url.endswith(job_id))
    retried = page.url.rsplit("/", 1)[1]
    page.wait_for_selector(f"h2:has-text('{retried}') .status.queued")
    with service.client() as client:
        assert client.get(f"/v1/jobs/{retried}").json()["recipe"] == (
            client.get(f"/v1/jobs/{job_id}").json()["recipe"]
        )
        client.post(f"/v1/jobs/{retried}/cancel")

    page.goto(f"{base}/jobs/{job_id}")
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url(f"{base}/")
    with service.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
